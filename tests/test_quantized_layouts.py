"""Issue 12 (7): weights behind DequantizeLinear in every layout ONNX allows, pruned to the zero point.

int4/uint4 (packed two per byte), blocked quantization (opset 21 ``block_size``) and uint8 without a zero
point: each output model is loaded and run by ONNX Runtime, compared with numpy dequantizing the stored
weights, and its effective weight holds 2:4 along K with exactly the pruned positions at the zero point.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.algorithms.masks import nm_violations
from graphprune.algorithms.pattern import NMPattern
from graphprune.passes.prune import PruneConfig
from graphprune.pipeline.files import check_file, prune_file
from tests.onnx_builders import run

K, N = 16, 8
PATTERN = NMPattern(2, 4)


def quantized_model(
    q: np.ndarray, elem: int, scale: np.ndarray, zero: np.ndarray | None, **attrs: int
) -> onnx.ModelProto:
    """y = x @ DequantizeLinear(q, scale, zero) with q stored [K, N]."""
    inits = [
        helper.make_tensor("q", elem, list(q.shape), q.astype(np.int32).flatten().tolist()),
        numpy_helper.from_array(scale.astype(np.float32), "s"),
    ]
    inputs = ["q", "s"]
    if zero is not None:
        inits.append(helper.make_tensor("z", elem, list(zero.shape), zero.astype(np.int32).flatten().tolist()))
        inputs.append("z")
    nodes = [
        helper.make_node("DequantizeLinear", inputs, ["w"], **attrs),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "quantized",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, N])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def stored(model: onnx.ModelProto, name: str) -> np.ndarray:
    return ir.from_proto(model).graph.initializers[name].const_value.numpy().astype(np.int32)


def dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int, block: int) -> np.ndarray:
    if block:
        scale, zero = (np.repeat(a, block, axis=axis) for a in (scale, zero))
    elif scale.ndim == 1:
        shape = [1, 1]
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (q - zero) * scale


CASES = {
    "int4": (TensorProto.INT4, (-8, 8), {"axis": 1}, lambda rng: rng.integers(-2, 3, N), (N,)),
    "uint4": (TensorProto.UINT4, (0, 16), {"axis": 1}, lambda rng: rng.integers(6, 10, N), (N,)),
    "int8-blocked": (TensorProto.INT8, (-128, 128), {"axis": 0, "block_size": 4}, None, (K // 4, N)),
    "int4-blocked": (TensorProto.INT4, (-8, 8), {"axis": 0, "block_size": 8}, None, (K // 8, N)),
    "uint8-no-zero-point": (TensorProto.UINT8, (0, 256), {"axis": 1}, "none", (N,)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_quantized_weight_is_pruned_in_its_stored_layout(tmp_path: Path, case: str) -> None:
    rng = np.random.default_rng(7700)  # this function's own data, whatever ran before
    elem, (low, high), attrs, zero_of, param_shape = CASES[case]
    q = rng.integers(low, high, (K, N))
    scale = rng.uniform(0.05, 0.2, param_shape).astype(np.float32)
    if zero_of == "none":
        zero = None
    elif zero_of is None:
        zero = rng.integers(max(low, -3), min(high, 4), param_shape)
    else:
        zero = zero_of(rng)
    model = quantized_model(q, elem, scale, zero, **attrs)
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))

    out, result = prune_file(path, PruneConfig(PATTERN, include_head=True), tmp_path / "out.onnx")
    assert [w.name for w in result.pruned] == ["q"], result.weights
    pruned_model = onnx.load_model(str(out))
    (init_q,) = [t for t in pruned_model.graph.initializer if t.name == "q"]
    assert init_q.data_type == elem
    if elem in (TensorProto.INT4, TensorProto.UINT4):
        assert len(init_q.raw_data) == K * N // 2  # packed, two per byte

    after = stored(pruned_model, "q")
    zeros = np.zeros(param_shape, np.int32) if zero is None else zero.astype(np.int32)
    effective = dequantize(after, scale, zeros, attrs["axis"], attrs.get("block_size", 0))
    assert nm_violations(effective.T, PATTERN).size == 0  # (out, K): groups of 4 along K hold at most 2
    changed = after != q
    full_zero = np.broadcast_to(
        np.repeat(zeros, attrs["block_size"], axis=0) if "block_size" in attrs else zeros.reshape(1, -1), q.shape
    )
    np.testing.assert_array_equal(after[changed], full_zero[changed])  # pruned = the zero point, nothing else

    verdict = check_file(out, PATTERN, include_head=True)  # check reads the packed/blocked layout back
    assert verdict.ok and [w.name for w in verdict.weights] == ["q"]

    x = rng.standard_normal((3, K)).astype(np.float32)
    (y,) = run(pruned_model, {"x": x})  # ONNX Runtime loads and runs the written file
    np.testing.assert_allclose(y, x @ effective.astype(np.float32), rtol=1e-5, atol=1e-5)
