"""Residual Adds before LayerNormalization written as Sum (``quantize --target ort``): the same numbers under ONNX
Runtime's reference kernels, and its optimiser no longer swaps in SkipLayerNormalization."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import helper

from graphprune.quantize.layer_norm_sums import sum_before_layer_norms
from tests.onnx_builders import init, make_model, run, tensor

D = 8


def post_and_pre_norm(seed: int = 0) -> onnx.ModelProto:
    """A post-norm residual ``LN(x + xW + b)``, then a pre-norm one whose sum also feeds the next residual."""
    rng = np.random.default_rng(seed)
    consts = {
        "w": rng.standard_normal((D, D)).astype(np.float32),
        "b": rng.standard_normal(D).astype(np.float32),
        "g": rng.standard_normal(D).astype(np.float32),
        "beta": rng.standard_normal(D).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["h"]),
        helper.make_node("Add", ["h", "x"], ["r1"]),
        helper.make_node("LayerNormalization", ["r1", "g", "beta"], ["n1"], axis=-1, epsilon=1e-12),
        helper.make_node("Add", ["n1", "x"], ["r2"]),  # read by the norm and the next residual: left alone
        helper.make_node("LayerNormalization", ["r2", "g", "beta"], ["n2"], axis=-1, epsilon=1e-12),
        helper.make_node("Add", ["r2", "n2"], ["y"]),
    ]
    inits = [init(v, k) for k, v in consts.items()]
    return make_model(nodes, [tensor("x", shape=[2, 5, D])], [tensor("y", shape=[2, 5, D])], inits)


def optimised_ops(model: onnx.ModelProto | ir.Model, tmp_path: Path) -> list[str]:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]


def test_post_norm_residual_becomes_a_sum_with_the_same_outputs(tmp_path: Path) -> None:
    before = post_and_pre_norm()
    model = ir.from_proto(before)
    assert sum_before_layer_norms(model) == ["r1_sum"]
    ops = [n.op_type for n in model.graph]
    assert ops.count("Sum") == 1 and ops.count("Add") == 3
    x = {"x": np.random.default_rng(1860).standard_normal((2, 5, D)).astype(np.float32)}
    np.testing.assert_array_equal(run(model, x)[0], run(before, x)[0])  # reference kernels: bit for bit
    assert "SkipLayerNormalization" in optimised_ops(before, tmp_path)
    ops = optimised_ops(model, tmp_path)
    assert "LayerNormalization" in ops and ops.count("SkipLayerNormalization") <= 1  # the pre-norm one may fuse


def test_nothing_below_opset_17_or_without_layer_norm() -> None:
    proto = post_and_pre_norm()
    proto.opset_import[0].version = 16
    assert sum_before_layer_norms(ir.from_proto(proto)) == []
