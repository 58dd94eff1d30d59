"""Sparse-eligibility report from the ONNX alone: eligible and ineligible cases built in code."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.graph.targets import Consumer, Target
from graphprune.passes.convert import convert
from graphprune.tensorrt.eligibility import assess, eligibility_report, summary
from tests.onnx_builders import init, make_model, tensor
from tests.references import sparse_24


def matmul_model(weight: np.ndarray, dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    k, n = weight.shape
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    return make_model([node], [tensor("x", dtype, ["b", k])], [tensor("y", dtype, ["b", n])], [init(weight, "w")])


def conv_model(weight: np.ndarray) -> onnx.ModelProto:
    cout, cin, kh, kw = weight.shape
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv")
    return make_model(
        [node],
        [tensor("x", TensorProto.FLOAT16, [1, cin, 8, 8])],
        [tensor("y", TensorProto.FLOAT16, [1, cout, 8 - kh + 1, 8 - kw + 1])],
        [init(weight.astype(np.float16), "w")],
    )


def only(model: onnx.ModelProto, **kwargs: object):
    (record,) = eligibility_report(ir.from_proto(model), **kwargs)  # type: ignore[arg-type]
    return record


def test_fp16_24_large_matmul_is_eligible() -> None:
    record = only(matmul_model(sparse_24((512, 1024), 0).astype(np.float16), TensorProto.FLOAT16))
    assert record.status == "eligible" and record.reasons == ()
    assert (record.out_channels, record.k, record.precision) == (1024, 512, "fp16")
    assert record.pattern_ok and record.trt_layer.startswith("MatrixMultiply")


def test_fp32_is_ineligible_until_converted_or_built_with_fp16() -> None:
    model = matmul_model(sparse_24((512, 512), 0))
    record = only(model)
    assert record.status == "ineligible" and record.precision == "fp32"
    assert "convert the model to FP16 (`graphprune convert`" in record.reasons[0]
    assert only(model, precision="fp16").status == "eligible"  # a TensorRT 10 build with the FP16 flag
    assert only(convert(model).model).status == "eligible"


def test_pattern_along_the_wrong_axis_is_ineligible() -> None:
    # 2:4 along N (axis 1) instead of K (axis 0): almost every group along K has more than 2 non-zeros
    weight = sparse_24((512, 512), 1).astype(np.float16)
    record = only(matmul_model(weight, TensorProto.FLOAT16))
    assert record.status == "ineligible" and record.violations > 0
    assert "not 2:4 along K" in record.reasons[0]


def test_small_layer_is_too_small_to_gain_not_ineligible() -> None:
    record = only(matmul_model(sparse_24((128, 64), 0).astype(np.float16), TensorProto.FLOAT16))
    assert record.status == "too small to gain"
    assert "out=64 < 256" in record.reasons[0] and "K=128 < 256" in record.reasons[0]


def test_k_not_multiple_of_four() -> None:
    record = only(matmul_model(np.zeros((258, 512), np.float16), TensorProto.FLOAT16))
    assert record.status == "ineligible" and "not a multiple of 4" in record.reasons[0]


def test_conv_group_one_pattern_along_input_channels() -> None:
    record = only(conv_model(sparse_24((256, 256, 3, 3), 1)))
    assert record.status == "eligible" and record.trt_layer == "Convolution"
    wrong = only(conv_model(sparse_24((256, 256, 3, 3), 0)))  # 2:4 along output channels
    assert wrong.status == "ineligible"


def test_grouped_conv_and_unsupported_op_from_records() -> None:
    weight = sparse_24((256, 256, 1, 1), 1)
    consumer = Consumer(node="conv", op="Conv", input_index=1, activation="x", activation_axis=1, output="y")
    target = Target(
        name="w", op="Conv", shape=weight.shape, dtype="float16", k_axis=1, out_axis=0, consumers=(consumer,)
    )
    record = assess(target, weight, "fp16", group=2)
    assert record.status == "ineligible" and "group=2" in record.reasons[0]
    other = Target(
        name="w",
        op="Einsum",
        shape=(256, 256),
        dtype="float16",
        k_axis=0,
        out_axis=1,
        consumers=(
            Consumer(node="e", op="Einsum", input_index=1, activation="x", activation_axis=-1, output="y"),
        ),
    )
    assert "no sparse kernels" in assess(other, sparse_24((256, 256), 0), "fp16").reasons[0]


def test_int8_qdq_weight_zero_is_its_zero_point() -> None:
    q = (sparse_24((256, 256), 0) * 20).round().clip(-100, 100).astype(np.int8) + np.int8(3)
    zero_point = np.int8(3)
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "scale", "zp"], ["w"], name="dq"),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
    ]
    model = make_model(
        nodes,
        [tensor("x", shape=["b", 256])],
        [tensor("y", shape=["b", 256])],
        [init(q, "wq"), init(np.array(0.05, np.float32), "scale"), init(np.array(zero_point), "zp")],
    )
    record = only(model)
    assert record.precision == "int8-qdq" and record.status == "eligible", record.reasons


def test_summary_counts_each_status() -> None:
    records = [
        only(matmul_model(sparse_24((512, 512), 0).astype(np.float16), TensorProto.FLOAT16)),
        only(matmul_model(sparse_24((512, 512), 0))),
    ]
    assert summary(records) == "1 eligible, 0 too small to gain, 1 ineligible"


@pytest.mark.parametrize(("dtype", "expected"), [(TensorProto.FLOAT16, "fp16"), (TensorProto.BFLOAT16, "bf16")])
def test_precision_read_from_consumer_output(dtype: int, expected: str) -> None:
    weight = sparse_24((512, 512), 0)
    model = matmul_model(weight, dtype)
    if dtype == TensorProto.BFLOAT16:
        raw = weight.astype(ml_dtypes.bfloat16).view(np.uint16).tobytes()
        stored = helper.make_tensor("w", TensorProto.BFLOAT16, [512, 512], raw, raw=True)
    else:
        stored = numpy_helper.from_array(weight.astype(np.float16), "w")
    model.graph.initializer[0].CopyFrom(stored)
    record = only(model)
    assert record.precision == expected and record.status == "eligible"


def test_precision_is_the_type_the_weight_arrives_in() -> None:
    """A float32 weight cast to float16 multiplies in fp16; a Constant node's weight reads like an initializer."""
    w = sparse_24((512, 512), 0)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w")),
        helper.make_node("Cast", ["w"], ["w16"], to=TensorProto.FLOAT16),
        helper.make_node("MatMul", ["x", "w16"], ["y"], name="mm"),
    ]
    model = make_model(nodes, [tensor("x", TensorProto.FLOAT16, ["b", 512])], [tensor("y", TensorProto.FLOAT16)])
    record = only(model)
    assert (record.precision, record.status, record.violations) == ("fp16", "eligible", 0)
    w[0, :] = 1.0  # the first group of 4 along K of every column now holds 3 or 4 non-zeros
    nodes[0] = helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w"))
    model = make_model(nodes, [tensor("x", TensorProto.FLOAT16, ["b", 512])], [tensor("y", TensorProto.FLOAT16)])
    assert only(model).violations == int(np.count_nonzero((w[:4] != 0).sum(axis=0) > 2))
