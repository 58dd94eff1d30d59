"""How far ``quantize --target ort``'s attention fusion moves a model's outputs: the FP32 model before and after
:func:`graphprune.quantize.fuse_attention.fuse_attention` alone, both run by ONNX Runtime (default graph
optimisations, one thread) on Brown held-out windows, unpadded (the fused node's flash branch) and in padded
batches (its masked branch: every second window cut to a random length, the rest padding). Prints, for the last
float output (the sentence embedding of both MiniLM exports), the largest absolute difference, the largest
relative to its magnitude, and the lowest and mean per-sample cosine.

    python benchmarks/fused_attention_check.py model.onnx tokenizer.json heldout.txt --windows 32 --seqlen 128
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from graphprune.quantize.fuse_attention import fuse_attention


def windows(tokenizer: Path, text: Path, count: int, seqlen: int, seed: int) -> np.ndarray:
    """``count`` windows of ``seqlen`` tokens at seeded random places (tokenised as ``calibrate`` does)."""
    from graphprune.calibration.text import _tokenise

    ids = _tokenise(text, tokenizer)
    starts = np.random.default_rng(seed).integers(0, len(ids) - seqlen, count)
    return np.stack([ids[s : s + seqlen] for s in starts])


def compare(before: ort.InferenceSession, after: ort.InferenceSession, ids: np.ndarray, padded: bool) -> dict:
    mask = np.ones_like(ids)
    if padded:
        lengths = np.random.default_rng(1).integers(ids.shape[1] // 4, ids.shape[1], len(ids))
        mask[1::2] = np.arange(ids.shape[1])[None] < lengths[1::2, None]
    names = {i.name for i in before.get_inputs()}
    feed = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in names:
        feed["token_type_ids"] = np.zeros_like(ids)
    output = [o.name for o in before.get_outputs() if o.type == "tensor(float)"][-1:]
    rows = []
    for i in range(0, len(ids), 8):
        part = {k: v[i : i + 8] for k, v in feed.items()}
        rows.append((before.run(output, part)[0], after.run(output, part)[0]))
    want = np.concatenate([r[0] for r in rows]).reshape(len(ids), -1).astype(np.float64)
    got = np.concatenate([r[1] for r in rows]).reshape(len(ids), -1).astype(np.float64)
    cosine = (want * got).sum(1) / np.linalg.norm(want, axis=1) / np.linalg.norm(got, axis=1)
    diff = np.abs(got - want).max()
    return {
        "padded": padded,
        "max_abs": float(diff),
        "max_rel": float(diff / np.abs(want).max()),
        "cosine_min": float(cosine.min()),
        "cosine_mean": float(cosine.mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("tokenizer", type=Path)
    parser.add_argument("text", type=Path)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = ir.load(args.model)
    fused, refused = fuse_attention(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fused.onnx"
        ir.save(model, path)
        after = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    before = ort.InferenceSession(str(args.model), options, providers=["CPUExecutionProvider"])
    ids = windows(args.tokenizer, args.text, args.windows, args.seqlen, args.seed)
    for padded in (False, True):
        row = {
            "model": str(args.model),
            "fused": len(fused),
            "refused": len(refused),
            **compare(before, after, ids, padded),
        }
        print(json.dumps(row))


if __name__ == "__main__":
    main()
