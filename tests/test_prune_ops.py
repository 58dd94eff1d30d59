"""Each kind of target, pruned and run in ONNX Runtime, against numpy's X @ (W ⊙ mask)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphprune.algorithms.masks import nm_violations
from graphprune.algorithms.pattern import NMPattern
from graphprune.graph.stored import stored_values
from graphprune.graph.targets import find_targets
from graphprune.graph.weights import read_weight
from graphprune.passes.check import CheckPass
from graphprune.passes.prune import PruneConfig, PrunePass
from tests.onnx_builders import init, initializer, reference_nm_mask, run, tensor
from tests.onnx_builders import make_ir_model as make_model

PATTERN = NMPattern(2, 4)
CONFIG = PruneConfig(PATTERN, include_head=True)


@dataclass
class Case:
    model: ir.Model
    feeds: dict[str, np.ndarray]
    weight: str
    k_axis: int  # in stored coordinates
    numpy_output: Callable[[dict[str, np.ndarray], np.ndarray], np.ndarray]  # feeds, masked stored W -> Y
    rtol: float = 1e-5


def tied(magnitudes: np.ndarray) -> bool:
    """Whether two weights of a group of 4 along K (axis 0) have the same magnitude: the reference mask
    (``reference_nm_mask``) breaks ties by position, graphprune by a hash, so the test data must have none."""
    groups = np.moveaxis(magnitudes.reshape(-1, 4, *magnitudes.shape[1:]), 1, -1).reshape(-1, 4)
    return any(len(set(group.tolist())) < 4 for group in groups)


def matmul_b() -> Case:
    rng = np.random.default_rng(123400)  # this function's own data, whatever ran before
    w = rng.standard_normal((16, 8)).astype(np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [tensor("x", shape=[2, 3, 16])],
        [tensor("y")],
        [init(w, "w")],
    )
    return Case(model, {"x": rng.standard_normal((2, 3, 16)).astype(np.float32)}, "w", 0, lambda f, w: f["x"] @ w)


def matmul_constant_a() -> Case:
    rng = np.random.default_rng(123401)  # this function's own data, whatever ran before
    w = rng.standard_normal((6, 12)).astype(np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["w", "x"], ["y"])],
        [tensor("x", shape=[12, 5])],
        [tensor("y")],
        [init(w, "w")],
    )
    return Case(model, {"x": rng.standard_normal((12, 5)).astype(np.float32)}, "w", 1, lambda f, w: w @ f["x"])


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm(trans_a: int, trans_b: int) -> None:
    rng = np.random.default_rng(123402)  # this function's own data, whatever ran before
    k, m, n = 16, 3, 5
    w = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    node = helper.make_node("Gemm", ["a", "w", "c"], ["y"], transA=trans_a, transB=trans_b, alpha=0.5, beta=2.0)
    a_shape = [k, m] if trans_a else [m, k]
    model = make_model([node], [tensor("a", shape=a_shape)], [tensor("y")], [init(w, "w"), init(bias, "c")])

    def numpy_output(f: dict[str, np.ndarray], wm: np.ndarray) -> np.ndarray:
        a = f["a"].T if trans_a else f["a"]
        return 0.5 * a @ (wm.T if trans_b else wm) + 2.0 * bias

    feeds = {"a": rng.standard_normal(a_shape).astype(np.float32)}
    check_case(Case(model, feeds, "w", 1 if trans_b else 0, numpy_output))


def transpose_matmul() -> Case:
    rng = np.random.default_rng(123403)  # this function's own data, whatever ran before
    w = rng.standard_normal((8, 16)).astype(np.float32)  # stored [N, K], as PyTorch's Linear
    model = make_model(
        [
            helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
            helper.make_node("MatMul", ["x", "wt"], ["y"]),
        ],
        [tensor("x", shape=[4, 16])],
        [tensor("y")],
        [init(w, "w")],
    )
    return Case(model, {"x": rng.standard_normal((4, 16)).astype(np.float32)}, "w", 1, lambda f, w: f["x"] @ w.T)


def cast_matmul(dtype: type, rtol: float) -> Case:
    """A half-precision stored weight, cast to float32 before the MatMul."""
    rng = np.random.default_rng(123404)  # this function's own data, whatever ran before
    w = rng.standard_normal((16, 8)).astype(dtype)
    while tied(np.abs(w.astype(np.float32))):  # rounded to 8 or 11 bits, two weights of a group may tie
        w = rng.standard_normal((16, 8)).astype(dtype)
    model = make_model(
        [
            helper.make_node("Cast", ["w"], ["w32"], to=TensorProto.FLOAT),
            helper.make_node("MatMul", ["x", "w32"], ["y"]),
        ],
        [tensor("x", shape=[4, 16])],
        [tensor("y")],
        [init(w, "w")],
    )
    feeds = {"x": rng.standard_normal((4, 16)).astype(np.float32)}
    return Case(model, feeds, "w", 0, lambda f, w: f["x"] @ w.astype(np.float32), rtol=rtol)


def cast_fp16_matmul() -> Case:
    return cast_matmul(np.float16, 1e-5)


def cast_bf16_matmul() -> Case:
    return cast_matmul(ml_dtypes.bfloat16, 1e-4)


def dequantize_matmul() -> Case:
    rng = np.random.default_rng(123405)  # this function's own data, whatever ran before
    zero = rng.integers(-3, 3, size=8, dtype=np.int8)
    q = rng.integers(-120, 120, size=(16, 8), dtype=np.int8)
    while tied(np.abs(q.astype(np.int16) - zero)):  # integers: two weights of a group may tie
        q = rng.integers(-120, 120, size=(16, 8), dtype=np.int8)
    scale = rng.uniform(0.01, 0.05, size=8).astype(np.float32)
    model = make_model(
        [
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], axis=1),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        [tensor("x", shape=[4, 16])],
        [tensor("y")],
        [init(q, "q"), init(scale, "s"), init(zero, "z")],
        opset=13,
    )

    def numpy_output(f: dict[str, np.ndarray], qm: np.ndarray) -> np.ndarray:
        return f["x"] @ ((qm.astype(np.float32) - zero.astype(np.float32)) * scale)

    return Case(model, {"x": rng.standard_normal((4, 16)).astype(np.float32)}, "q", 0, numpy_output)


def conv() -> Case:
    rng = np.random.default_rng(123406)  # this function's own data, whatever ran before
    w = rng.standard_normal((6, 8, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    model = make_model([node], [tensor("x", shape=[1, 8, 5, 5])], [tensor("y")], [init(w, "w")])

    def numpy_output(f: dict[str, np.ndarray], wm: np.ndarray) -> np.ndarray:
        x = np.pad(f["x"], ((0, 0), (0, 0), (1, 1), (1, 1)))
        out = np.zeros((1, 6, 5, 5), np.float64)
        for i in range(3):
            for j in range(3):
                out += np.einsum("nchw,oc->nohw", x[:, :, i : i + 5, j : j + 5], wm[:, :, i, j])
        return out

    return Case(
        model, {"x": rng.standard_normal((1, 8, 5, 5)).astype(np.float32)}, "w", 1, numpy_output, rtol=1e-4
    )


def constant_node() -> Case:
    rng = np.random.default_rng(123407)  # this function's own data, whatever ran before
    w = rng.standard_normal((16, 8)).astype(np.float32)
    model = make_model(
        [
            helper.make_node("Constant", [], ["w"], value=init(w, "wv")),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        [tensor("x", shape=[4, 16])],
        [tensor("y")],
    )
    return Case(model, {"x": rng.standard_normal((4, 16)).astype(np.float32)}, "w", 0, lambda f, w: f["x"] @ w)


def fp16_model() -> Case:
    rng = np.random.default_rng(123408)  # this function's own data, whatever ran before
    w = rng.standard_normal((16, 8)).astype(np.float16)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [tensor("x", TensorProto.FLOAT16, [4, 16])],
        [tensor("y", TensorProto.FLOAT16)],
        [init(w, "w")],
    )
    feeds = {"x": rng.standard_normal((4, 16)).astype(np.float16)}
    return Case(model, feeds, "w", 0, lambda f, w: f["x"].astype(np.float32) @ w.astype(np.float32), rtol=2e-2)


def stored(model: ir.Model, name: str) -> np.ndarray:
    """The stored values of an initializer or a Constant node's output, read through the ONNX protobuf."""
    proto = ir.to_proto(model)
    if any(t.name == name for t in proto.graph.initializer):
        return initializer(proto, name)
    return onnx.numpy_helper.to_array(next(n.attribute[0].t for n in proto.graph.node if n.output[0] == name))


def effective(stored: np.ndarray, case: Case) -> np.ndarray:
    """The weight as the consumer multiplies it: for the quantized case, without the zero point."""
    if stored.dtype == np.int8:
        zero = initializer(case.model, "z")
        return stored.astype(np.int32) - zero.astype(np.int32)
    return stored


def check_case(case: Case) -> None:
    original = stored(case.model, case.weight).copy()
    (target,) = find_targets(case.model).targets
    assert (target.name, target.k_axis) == (case.weight, case.k_axis)

    result = PrunePass(config=CONFIG).call(case.model)
    assert [w.name for w in result.pruned] == [case.weight]

    pruned = stored(case.model, case.weight)
    assert pruned.dtype == original.dtype
    mask = reference_nm_mask(effective(original, case), case.k_axis, PATTERN.keep, PATTERN.group)
    zero = initializer(case.model, "z")[None, :] if original.dtype == np.int8 else 0
    expected_weight = np.where(mask, original, zero).astype(original.dtype)
    np.testing.assert_array_equal(pruned, expected_weight)

    (actual,) = run(case.model, case.feeds)
    expected = case.numpy_output(case.feeds, expected_weight)
    np.testing.assert_allclose(actual.astype(np.float64), expected, rtol=case.rtol, atol=case.rtol * 10)

    # Along the right axis and only there: exactly half of every group of 4 along K is zero.
    moved = np.moveaxis(effective(pruned, case), case.k_axis, -1)
    assert nm_violations(moved, PATTERN).size == 0
    assert np.count_nonzero(moved) == moved.size // 2
    assert CheckPass(PATTERN, include_head=True).call(case.model).ok
    assert result.achieved_sparsity() == pytest.approx(0.5)


@pytest.mark.parametrize(
    "build",
    [
        matmul_b,
        matmul_constant_a,
        transpose_matmul,
        cast_fp16_matmul,
        cast_bf16_matmul,
        dequantize_matmul,
        conv,
        constant_node,
        fp16_model,
    ],
)
def test_target_kinds(build: Callable[[], Case]) -> None:
    check_case(build())


def test_check_finds_a_violation_along_k_only() -> None:
    case = matmul_b()
    w = stored(case.model, "w")
    # Zero half of each row along N (the wrong axis): every K-group still holds 4 non-zeros in half the columns.
    wrong = w.copy()
    wrong[:, ::2] = 0
    case.model.graph.initializers["w"].const_value = ir.tensor(wrong, name="w")
    result = CheckPass(PATTERN, include_head=True).call(case.model)
    (weight,) = result.violations
    assert weight.bad_groups == (16 // 4) * 4  # 4 non-zero columns x 4 groups along K
    assert weight.first_bad == (0, 1)  # stored index [k, n] of the first bad group


def test_unstructured_sparsity_is_exact_per_output_neuron() -> None:
    from graphprune.algorithms.pattern import Unstructured

    case = matmul_b()
    PrunePass(config=PruneConfig(Unstructured(0.75), include_head=True)).call(case.model)
    w = stored(case.model, "w")
    # each output neuron is a column of the [K, N] weight: 16 inputs, int(16 * 0.75) = 12 zeros each
    assert (np.count_nonzero(w, axis=0) == 4).all()


def test_weights_are_read_as_stored() -> None:
    case = dequantize_matmul()
    (target,) = find_targets(case.model).targets
    stored = read_weight(stored_values(case.model.graph), target)
    assert stored.values.dtype == np.int8
    np.testing.assert_array_equal(stored.zero_value(), initializer(case.model, "z")[None, :])
