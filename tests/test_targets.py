"""Target discovery: what is pruned, what is skipped, and why."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphprune.algorithms.pattern import NMPattern
from graphprune.graph.selection import select_targets
from graphprune.graph.targets import find_targets
from graphprune.passes.prune import PruneConfig, PrunePass
from tests.onnx_builders import init, initializer, reference_nm_mask, run, tensor
from tests.onnx_builders import make_ir_model as make_model


def reasons(model, **kwargs) -> dict[str, str]:
    return {s.name: s.reason for s in find_targets(model, **kwargs).skips}


def test_k_not_a_multiple_of_the_group_is_skipped_with_its_reason() -> None:
    rng = np.random.default_rng(700)  # this function's own data, whatever ran before
    w = rng.standard_normal((10, 8)).astype(np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [tensor("x", shape=[2, 10])],
        [tensor("y")],
        [init(w, "w")],
    )
    result = PrunePass(config=PruneConfig(NMPattern(2, 4), include_head=True)).call(model)
    (skipped,) = result.skipped
    assert skipped.name == "w" and "K=10" in skipped.skipped and "4" in skipped.skipped
    np.testing.assert_array_equal(initializer(model, "w"), w)


def test_weight_that_is_a_graph_input_is_skipped() -> None:
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [tensor("x", shape=[2, 8]), tensor("w", shape=[8, 4])],
        [tensor("y")],
    )
    assert "graph input" in reasons(model)["w"]
    assert find_targets(model).targets == []


def test_initializer_overridable_as_graph_input_is_skipped() -> None:
    rng = np.random.default_rng(701)  # this function's own data, whatever ran before
    w = rng.standard_normal((8, 4)).astype(np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [tensor("x", shape=[2, 8]), tensor("w", shape=[8, 4])],
        [tensor("y")],
        [init(w, "w")],
    )
    assert "graph input" in reasons(model)["w"]


def test_shared_weight_is_pruned_once_for_all_consumers() -> None:
    rng = np.random.default_rng(702)  # this function's own data, whatever ran before
    w = rng.standard_normal((8, 8)).astype(np.float32)
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["a"]),
            helper.make_node("Relu", ["a"], ["r"]),
            helper.make_node("MatMul", ["r", "w"], ["y"]),
        ],
        [tensor("x", shape=[3, 8])],
        [tensor("y")],
        [init(w, "w")],
    )
    (target,) = find_targets(model).targets
    assert len(target.consumers) == 2 and target.k_axis == 0
    PrunePass(config=PruneConfig(include_head=True)).call(model)
    wm = np.where(reference_nm_mask(w, 0, 2, 4), w, 0)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    expected = np.maximum(x @ wm, 0) @ wm
    np.testing.assert_allclose(run(model, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)


def test_consumers_that_disagree_on_k_skip_the_weight() -> None:
    rng = np.random.default_rng(703)  # this function's own data, whatever ran before
    w = rng.standard_normal((8, 8)).astype(np.float32)
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["a"]),
            helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
            helper.make_node("MatMul", ["a", "wt"], ["y"]),
        ],
        [tensor("x", shape=[3, 8])],
        [tensor("y")],
        [init(w, "w")],
    )
    assert "disagree" in reasons(model)["w"]


def test_tied_lm_head_is_skipped_because_the_embedding_gather_reads_it() -> None:
    rng = np.random.default_rng(704)  # this function's own data, whatever ran before
    table = rng.standard_normal((32, 8)).astype(np.float32)
    model = make_model(
        [
            helper.make_node("Gather", ["table", "ids"], ["h"]),
            helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0]),
            helper.make_node("MatMul", ["h", "table_t"], ["logits"]),
        ],
        [tensor("ids", TensorProto.INT64, [1, 5])],
        [tensor("logits")],
        [init(table, "table")],
    )
    assert "Gather" in reasons(model)["table"]


@pytest.mark.parametrize(
    ("node", "weight", "reason"),
    [
        (helper.make_node("Conv", ["x", "w"], ["y"], group=8), np.ones((8, 1, 3, 3), np.float32), "group=8"),
        (helper.make_node("ConvTranspose", ["x", "w"], ["y"]), np.ones((8, 4, 3, 3), np.float32), "ConvTranspose"),
    ],
)
def test_convolutions_we_do_not_handle_are_skipped(node, weight, reason) -> None:
    model = make_model([node], [tensor("x", shape=[1, 8, 6, 6])], [tensor("y")], [init(weight, "w")])
    assert reason in reasons(model)["w"]


def test_integer_weight_outside_dequantize_is_skipped() -> None:
    q = np.ones((8, 4), np.int8)
    model = make_model(
        [
            helper.make_node("Cast", ["q"], ["w"], to=TensorProto.FLOAT),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        [tensor("x", shape=[2, 8])],
        [tensor("y")],
        [init(q, "q")],
    )
    assert "integer" in reasons(model)["q"]


def test_weight_computed_from_constants_is_reported() -> None:
    rng = np.random.default_rng(705)  # this function's own data, whatever ran before
    w = rng.standard_normal((4, 8)).astype(np.float32)
    shape = np.array([8, 4], np.int64)
    model = make_model(
        [helper.make_node("Reshape", ["w", "shape"], ["wr"]), helper.make_node("MatMul", ["x", "wr"], ["y"])],
        [tensor("x", shape=[2, 8])],
        [tensor("y")],
        [init(w, "w"), init(shape, "shape")],
    )
    assert "Reshape" in reasons(model)["wr"]


def two_layer_model(residual: bool) -> tuple:
    rng = np.random.default_rng(706)  # this function's own data, whatever ran before
    w1 = rng.standard_normal((8, 8)).astype(np.float32)
    w2 = rng.standard_normal((8, 8)).astype(np.float32)
    head = rng.standard_normal((8, 16)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["b"]),
    ]
    if residual:  # an encoder without a head: the last projection feeds the output beside a residual path
        nodes.append(helper.make_node("Add", ["b", "a"], ["y"]))
        inits = [init(w1, "w1"), init(w2, "w2")]
    else:  # an LM: the head projects the last hidden state to the output
        nodes.append(helper.make_node("MatMul", ["b", "head"], ["y"]))
        inits = [init(w1, "w1"), init(w2, "w2"), init(head, "head")]
    return make_model(nodes, [tensor("x", shape=[2, 8])], [tensor("y")], inits)


def test_the_output_head_is_found_and_left_dense_by_default() -> None:
    model = two_layer_model(residual=False)
    assert [t.name for t in find_targets(model).targets if t.is_head] == ["head"]
    assert "head" in reasons(model, include_head=False)["head"]
    result = PrunePass(config=PruneConfig()).call(model)
    assert sorted(w.name for w in result.pruned) == ["w1", "w2"]
    assert np.count_nonzero(initializer(model, "head")) == 8 * 16


def test_a_residual_output_has_no_head() -> None:
    model = two_layer_model(residual=True)
    assert not any(t.is_head for t in find_targets(model).targets)


def test_include_and_exclude_patterns() -> None:
    scan = find_targets(two_layer_model(residual=True))
    chosen = select_targets(scan, NMPattern(2, 4), include=["w*"], exclude=["*2"])
    assert [t.name for t in chosen.targets] == ["w1"]
    assert {s.name: s.reason for s in chosen.skips} == {"w2": "excluded by `exclude=*2`"}
    chosen = select_targets(scan, NMPattern(2, 4), include=["MatMul_0"])  # node labels match too
    assert [t.name for t in chosen.targets] == ["w1"]
