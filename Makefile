.PHONY: setup serve test bench-smoke

setup:
	./scripts/bootstrap.sh

serve: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m app

test: setup
	./scripts/system-deps.sh
	HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q

bench-smoke: setup
	HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.ppl --smoke
