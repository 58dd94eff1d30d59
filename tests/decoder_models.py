"""A tiny decoder (embedding, residual blocks, head) with external data, and its token feeds: shared by the
segment-wise tests of several modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from graphprune.calibration.request import CalibrationRequest
from graphprune.graph.model_io import load_model, to_proto
from tests.onnx_builders import init, make_model, tensor

VOCAB, HIDDEN, BLOCKS = 32, 8, 3


def decoder_like() -> onnx.ModelProto:
    """input_ids -> embedding -> three residual blocks h + relu(h A) B -> head: a tiny LM in the 7B's shape."""
    rng = np.random.default_rng(1400)  # this function's own data, whatever ran before
    weights = {"embed": rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)}
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["h0"], axis=0)]
    for i in range(1, BLOCKS + 1):
        weights[f"a{i}"] = rng.standard_normal((HIDDEN, 2 * HIDDEN)).astype(np.float32)
        weights[f"b{i}"] = rng.standard_normal((2 * HIDDEN, HIDDEN)).astype(np.float32)
        nodes += [
            helper.make_node("MatMul", [f"h{i - 1}", f"a{i}"], [f"u{i}"]),
            helper.make_node("Relu", [f"u{i}"], [f"r{i}"]),
            helper.make_node("MatMul", [f"r{i}", f"b{i}"], [f"v{i}"]),
            helper.make_node("Add", [f"h{i - 1}", f"v{i}"], [f"h{i}"]),
        ]
    weights["head"] = rng.standard_normal((HIDDEN, VOCAB)).astype(np.float32)
    nodes.append(helper.make_node("MatMul", [f"h{BLOCKS}", "head"], ["logits"]))
    return make_model(
        nodes,
        [tensor("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [tensor("logits")],
        [init(w, name) for name, w in weights.items()],
    )


def save_external(model: onnx.ModelProto, path: Path) -> Path:
    """Every tensor in ``<name>.data``, as a large model's would be."""
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, location=f"{path.name}.data", size_threshold=0)
    return path


def feeds() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1401)  # this function's own data, whatever ran before
    ids = rng.integers(0, VOCAB, size=(6, 10), dtype=np.int64)
    return [{"input_ids": ids[:2]}, {"input_ids": ids[2:4]}, {"input_ids": ids[4:]}]


def request(data: list, max_memory: int | None = None) -> CalibrationRequest:
    return CalibrationRequest(data=data, batch_size=2, max_memory=max_memory)


def weights_of(path: Path) -> dict[str, np.ndarray]:
    model = to_proto(load_model(path))
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
