"""Sequential calibration against numpy: each block calibrated on the outputs of the already pruned blocks."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.algorithms.pattern import NMPattern
from graphprune.algorithms.scores import Method
from graphprune.errors import GraphpruneError
from graphprune.graph.stored import stored_tensor, stored_values
from graphprune.graph.targets import find_targets
from graphprune.passes.prune import PruneConfig
from graphprune.pipeline.sequential import prune_sequentially, target_groups
from tests.onnx_builders import init, initializer, make_model, residual_blocks_model, tensor
from tests.references import wanda_numpy

PATTERN = NMPattern(2, 4)


def two_block_model():
    """h1 = relu(x W1); h2 = relu(h1 W2); y = h1 + h2 W3: three levels, and h1 must be kept between segments."""
    rng = np.random.default_rng(2100)  # this function's own data, whatever ran before
    w1, w2, w3 = (rng.standard_normal((8, 8)).astype(np.float32) for _ in range(3))
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["a1"]),
            helper.make_node("Relu", ["a1"], ["h1"]),
            helper.make_node("MatMul", ["h1", "w2"], ["a2"]),
            helper.make_node("Relu", ["a2"], ["h2"]),
            helper.make_node("MatMul", ["h2", "w3"], ["a3"]),
            helper.make_node("Add", ["h1", "a3"], ["y"]),
        ],
        [tensor("x", shape=["b", 5, 8])],
        [tensor("y")],
        [init(w1, "w1"), init(w2, "w2"), init(w3, "w3")],
    )
    return model, (w1, w2, w3)


def test_groups_follow_the_dependency_order() -> None:
    model, _ = two_block_model()
    model = ir.from_proto(model)
    groups = target_groups(model, find_targets(model).targets)
    assert [[t.name for t in g] for g in groups] == [["w1"], ["w2"], ["w3"]]


def test_each_block_is_calibrated_on_the_pruned_blocks_before_it() -> None:
    rng = np.random.default_rng(2101)  # this function's own data, whatever ran before
    model, (w1, w2, w3) = two_block_model()
    x = rng.standard_normal((6, 5, 8)).astype(np.float32)
    batches = [{"x": x[:4]}, {"x": x[4:]}]

    model = ir.from_proto(model)
    result, warnings = prune_sequentially(model, PruneConfig(PATTERN, method=Method.WANDA), batches)
    assert warnings == [] and sorted(w.name for w in result.pruned) == ["w1", "w2", "w3"]

    # numpy: block 2 sees relu(x W1') with W1' already pruned, block 3 sees relu(h1' W2')
    w1p = wanda_numpy(w1, x)
    h1 = np.maximum(x @ w1p, 0)
    w2p = wanda_numpy(w2, h1)
    h2 = np.maximum(h1 @ w2p, 0)
    w3p = wanda_numpy(w3, h2)
    for name, expected in (("w1", w1p), ("w2", w2p), ("w3", w3p)):
        np.testing.assert_array_equal(initializer(model, name), expected.astype(np.float32))
    # and one-shot differs: block 2 scored on the dense block 1 would pick another mask here
    assert not np.array_equal(wanda_numpy(w2, np.maximum(x @ w1, 0)), w2p)


def test_sequential_refuses_control_flow() -> None:
    model, _ = two_block_model()
    branch = helper.make_graph([helper.make_node("Identity", ["y"], ["z"])], "b", [], [tensor("z")])
    model.graph.node.append(helper.make_node("If", ["cond"], ["out"], then_branch=branch, else_branch=branch))
    model.graph.input.append(tensor("cond", TensorProto.BOOL, []))
    with pytest.raises(GraphpruneError, match="control flow"):
        prune_sequentially(ir.from_proto(model), PruneConfig(PATTERN), [{"x": np.ones((1, 5, 8), np.float32)}])


def test_blocks_are_found_from_the_repeating_levels() -> None:
    model, _ = residual_blocks_model()
    model = ir.from_proto(model)
    targets = find_targets(model).targets
    groups = target_groups(model, targets)
    assert [[t.name for t in g] for g in groups] == [["a1", "b1"], ["a2", "b2"]]
    assert len(target_groups(model, targets, sequential="level")) == 4


def test_a_block_is_calibrated_dense_inside_and_pruned_before_the_next() -> None:
    rng = np.random.default_rng(2103)  # this function's own data, whatever ran before
    model, w = residual_blocks_model()
    x = rng.standard_normal((12, 8)).astype(np.float32)
    model = ir.from_proto(model)
    prune_sequentially(model, PruneConfig(PATTERN, method=Method.WANDA), [{"x": x[:5]}, {"x": x[5:]}])

    # the reference: inside a block, B is scored on relu(h A) with A still dense; the next block sees pruned ones
    a1 = wanda_numpy(w["a1"], x)
    b1 = wanda_numpy(w["b1"], np.maximum(x @ w["a1"], 0))
    h1 = x + np.maximum(x @ a1, 0) @ b1
    a2 = wanda_numpy(w["a2"], h1)
    b2 = wanda_numpy(w["b2"], np.maximum(h1 @ w["a2"], 0))
    for name, expected in (("a1", a1), ("b1", b1), ("a2", a2), ("b2", b2)):
        np.testing.assert_allclose(initializer(model, name), expected, rtol=0, atol=0)


# ---------------------------------------------------------------- weights reached through other nodes (issue 12.8)

SCALE, ZERO = np.float32(0.02), np.int8(3)


def stored_weight(variant: str, w: np.ndarray, name: str) -> tuple[list, list, str]:
    """(nodes, initializers, the tensor the MatMul reads) storing ``w`` [K, N] behind ``variant``."""
    out = f"{name}_seen"
    if variant == "transpose":  # stored [N, K], as PyTorch's Linear
        return [helper.make_node("Transpose", [name], [out], perm=[1, 0])], [init(w.T.copy(), name)], out
    if variant == "cast":  # stored in float16, computed in float32
        return (
            [helper.make_node("Cast", [name], [out], to=TensorProto.FLOAT)],
            [init(w.astype(np.float16), name)],
            out,
        )
    if variant == "dequantize":  # int8 with a scalar scale and zero point
        q = np.clip(np.round(w / SCALE) + ZERO, -128, 127).astype(np.int8)
        node = helper.make_node("DequantizeLinear", [name, f"{name}_s", f"{name}_z"], [out])
        return [node], [init(q, name), init(np.array(SCALE), f"{name}_s"), init(np.array(ZERO), f"{name}_z")], out
    assert variant == "constant"
    return [helper.make_node("Constant", [], [name], value=numpy_helper.from_array(w, name))], [], name


def effective(model: ir.Model, variant: str, name: str) -> np.ndarray:
    """The [K, N] float32 weight the MatMul multiplies by, read back from the model."""
    stored = stored_tensor(stored_values(model.graph)[name]).numpy()
    if variant == "transpose":
        return stored.T
    if variant == "dequantize":
        return (stored.astype(np.float32) - np.float32(ZERO)) * SCALE
    return stored.astype(np.float32)


@pytest.mark.parametrize("sequential", ["block", "level"])
@pytest.mark.parametrize("variant", ["transpose", "cast", "dequantize", "constant"])
def test_later_blocks_see_pruned_weights_behind_other_nodes(variant: str, sequential: str) -> None:
    """Two residual blocks h = h + relu(h A) B with every weight stored behind ``variant``: in block mode the
    second block must be calibrated on the pruned first block, not on a cached dense transform of its weights."""
    rng = np.random.default_rng(8)
    shapes = {"a1": (16, 32), "b1": (32, 16), "a2": (16, 32), "b2": (32, 16)}
    dense = {n: rng.standard_normal(shape).astype(np.float32) for n, shape in shapes.items()}
    if variant == "cast":
        dense = {n: w.astype(np.float16).astype(np.float32) for n, w in dense.items()}
    nodes, inits, seen = [], [], {}
    for name, w in dense.items():
        more_nodes, more_inits, seen[name] = stored_weight(variant, w, name)
        nodes, inits = nodes + more_nodes, inits + more_inits
    h = "x"
    for block in (1, 2):
        nodes += [
            helper.make_node("MatMul", [h, seen[f"a{block}"]], [f"u{block}"]),
            helper.make_node("Relu", [f"u{block}"], [f"r{block}"]),
            helper.make_node("MatMul", [f"r{block}", seen[f"b{block}"]], [f"v{block}"]),
            helper.make_node("Add", [h, f"v{block}"], [f"h{block}"]),
        ]
        h = f"h{block}"
    model = ir.from_proto(make_model(nodes, [tensor("x", shape=["b", 16])], [tensor(h)], inits, opset=17))
    dense = {n: effective(model, variant, n) for n in dense}
    x = rng.standard_normal((12, 16)).astype(np.float32)

    result, _ = prune_sequentially(
        model, PruneConfig(PATTERN, method=Method.WANDA), [{"x": x[:5]}, {"x": x[5:]}], sequential=sequential
    )
    assert sorted(w.name for w in result.pruned) == sorted(dense)

    # numpy: in block mode B is scored with its block's A still dense; in level mode with A already pruned
    relu = lambda a: np.maximum(a, 0)  # noqa: E731
    a1 = wanda_numpy(dense["a1"], x)
    b1 = wanda_numpy(dense["b1"], relu(x @ (dense["a1"] if sequential == "block" else a1)))
    h1 = x + relu(x @ a1) @ b1
    a2 = wanda_numpy(dense["a2"], h1)
    b2 = wanda_numpy(dense["b2"], relu(h1 @ (dense["a2"] if sequential == "block" else a2)))
    for name, expected in (("a1", a1), ("b1", b1), ("a2", a2), ("b2", b2)):
        np.testing.assert_allclose(effective(model, variant, name), expected, rtol=1e-6, atol=1e-6)
    # the second block scored on the dense first block would differ: the test tells the two apart
    h1_dense = x + relu(x @ dense["a1"]) @ dense["b1"]
    assert not np.array_equal(wanda_numpy(dense["a2"], h1_dense), a2)
