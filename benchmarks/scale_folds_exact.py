"""Fold random positive scales at every SmoothQuant fold point of real models; compare ONNX Runtime's outputs.

For each model: ``find_scale_folds`` (after ONNX shape inference where the file records no shapes), a scale
``exp(0.5·N(0, 1))`` per channel folded at every fold point, every float output before and after on the same
random tokens (batch 2, 8 tokens). The folds are exact, so the change is float32 rounding only.

    python benchmarks/scale_folds_exact.py MODEL.onnx [...]
"""

from __future__ import annotations

import collections
import sys

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx_ir.passes.common import ShapeInferencePass

from graphprune.graph.model_io import load_model, to_proto
from graphprune.graph.scale_folds import find_scale_folds, fold_scale


def _session(model: ir.Model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])


def _feeds(model: ir.Model, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {}
    for value in model.graph.inputs:
        shape = [2, *(d if isinstance(d, int) else 8 for d in value.shape.dims[1:])]  # type: ignore[union-attr]
        if "mask" in str(value.name):
            feeds[str(value.name)] = np.ones(shape, np.int64)
        elif "type" in str(value.name):
            feeds[str(value.name)] = np.zeros(shape, np.int64)
        else:
            feeds[str(value.name)] = rng.integers(0, 1000, shape).astype(np.int64)
    return feeds


def main() -> None:
    for path in sys.argv[1:]:
        model = load_model(path)
        if not any(v.shape is not None for n in model.graph for v in n.outputs if not v.is_graph_output()):
            ShapeInferencePass()(model)
        rng = np.random.default_rng(0)
        feeds = _feeds(model, rng)
        names = [str(o.name) for o in model.graph.outputs]
        before = _session(model).run(names, feeds)
        folds = find_scale_folds(model)
        for fold in folds:
            fold_scale(fold, np.exp(0.5 * rng.standard_normal(fold.channels)).astype(np.float32))
        after = _session(model).run(names, feeds)
        kinds = dict(collections.Counter(f"{f.kind} into {len(f.consumers)}" for f in folds))
        print(path, len(folds), "folds", kinds)
        for name, b, a in zip(names, before, after, strict=True):
            if b.dtype.kind == "f":
                change, largest = float(np.abs(a - b).max()), float(np.abs(b).max())
                print(f"  {name} {b.shape}: largest change {change:.2g}, largest |value| {largest:.3g}")


if __name__ == "__main__":
    main()
