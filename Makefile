.PHONY: setup serve lint test test-fast bench-smoke loadtest

setup:
	./scripts/bootstrap.sh

serve: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m app

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

# Every tier: the in-process tests on two workers (496 in 131-149 s on 2 cores), then the tests that start servers,
# nginx, Prometheus or Chromium one at a time (they measure a machine they should have to themselves).
test: lint
	./scripts/system-deps.sh
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -n 2 -m "not process and not browser"
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -m "process or browser"

# The developer's loop: no real model, no other process, no system binary (tests/conftest.py), on two workers:
# 490 tests in about 63 s on 2 cores.
test-fast: lint
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -n 2 -m "not slow and not process and not browser"

bench-smoke: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.ppl --smoke

loadtest: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m loadtest.run --serve --prometheus --users 4 --run-time 60
