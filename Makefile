.PHONY: setup serve test bench-smoke loadtest

setup:
	./scripts/bootstrap.sh

serve: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m app

test: setup
	./scripts/system-deps.sh
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q

bench-smoke: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.ppl --smoke

loadtest: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m loadtest.run --serve --prometheus --users 4 --run-time 60
