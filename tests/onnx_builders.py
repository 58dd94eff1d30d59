"""Tiny ONNX models built in code for the tests, and ONNX Runtime helpers."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8  # accepted by every ONNX Runtime we support; onnx >= 1.20 would write 14 by default


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto] = (),  # type: ignore[assignment]
    opset: int = 17,
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = IR_VERSION
    return model


def tensor(name: str, elem: int = TensorProto.FLOAT, shape: list | None = None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def init(array: np.ndarray, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


def run(model: onnx.ModelProto | ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    if isinstance(model, ir.Model):
        model = ir.to_proto(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def initializer(model: onnx.ModelProto | ir.Model, name: str) -> np.ndarray:
    if isinstance(model, ir.Model):
        return model.graph.initializers[name].const_value.numpy()  # type: ignore[union-attr]
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def reference_nm_mask(weight: np.ndarray, k_axis: int, keep: int, group: int) -> np.ndarray:
    """Independent N:M magnitude mask: argsort each group of ``group`` along ``k_axis`` (no ties expected)."""
    moved = np.moveaxis(np.abs(weight.astype(np.float64)), k_axis, -1)
    groups = moved.reshape(-1, group)
    order = np.argsort(-groups, axis=1, kind="stable")
    mask = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(mask, order[:, :keep], True, axis=1)
    return np.moveaxis(mask.reshape(moved.shape), -1, k_axis)


def make_ir_model(*args, **kwargs) -> ir.Model:  # type: ignore[no-untyped-def]
    """:func:`make_model` as the onnx-ir model graphprune's passes work on."""
    return ir.from_proto(make_model(*args, **kwargs))


def residual_blocks_model():
    """Two residual blocks h = h + relu(h A) B: levels A1, B1, A2, B2 whose shapes repeat with period 2."""
    rng = np.random.default_rng(2102)  # its own data, whatever ran before
    weights = {}
    nodes = []
    h = "x"
    for block in (1, 2):
        a, b = f"a{block}", f"b{block}"
        weights[a] = rng.standard_normal((8, 16)).astype(np.float32)
        weights[b] = rng.standard_normal((16, 8)).astype(np.float32)
        nodes += [
            helper.make_node("MatMul", [h, a], [f"u{block}"]),
            helper.make_node("Relu", [f"u{block}"], [f"r{block}"]),
            helper.make_node("MatMul", [f"r{block}", b], [f"v{block}"]),
            helper.make_node("Add", [h, f"v{block}"], [f"h{block}"]),
        ]
        h = f"h{block}"
    model = make_model(
        nodes, [tensor("x", shape=["b", 8])], [tensor(h)], [init(w, name) for name, w in weights.items()]
    )
    return model, weights
