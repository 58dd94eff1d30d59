"""Attention heads as units: multi-head and grouped-query attention, against ONNX Runtime and numpy."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper
from onnx_ir.passes.common import TopologicalSortPass

from graphprune.graph.groups import find_groups
from graphprune.graph.heads import ONE_KV_GROUP
from graphprune.passes.shrink import Removal, ShrinkPass
from graphprune.pipeline.shrink import ShrinkConfig, shrink_model
from tests.onnx_builders import SEQ, attention, attention_np, draw, init, run


def _drop(w: dict, q_heads: list[int], kv_heads: list[int], head_dim: int) -> dict:
    def cols(heads: list[int]) -> list[int]:
        return [h * head_dim + i for h in heads for i in range(head_dim)]

    return {
        "wq": np.delete(w["wq"], cols(q_heads), axis=1),
        "bq": np.delete(w["bq"], cols(q_heads)),
        "wk": np.delete(w["wk"], cols(kv_heads), axis=1),
        "wv": np.delete(w["wv"], cols(kv_heads), axis=1),
        "wo": np.delete(w["wo"], cols(q_heads), axis=0),
    }


def _shrink(model: onnx.ModelProto, units: list[int]) -> tuple[onnx.ModelProto, object]:
    m = ir.from_proto(model)
    scan = find_groups(m, ("heads",))
    assert len(scan.groups) == 1, scan.skips
    group = scan.groups[0]
    ShrinkPass([Removal(group, np.array(units))])(m)
    return ir.to_proto(m), group


def test_multi_head_attention_removes_whole_heads_and_rewrites_head_counts() -> None:
    rng = np.random.default_rng(101)  # this function's own data, whatever ran before
    model, w = attention(heads=4, kv_heads=4, head_dim=2)
    x = draw(rng, 3, SEQ, 8)
    small, group = _shrink(model, [1, 3])
    assert group.kind == "heads" and group.width == 2  # type: ignore[attr-defined]
    expected = attention_np(_drop(w, [1, 3], [1, 3], 2), x, 2, 2, 2)
    np.testing.assert_allclose(run(small, {"x": x})[0], expected, rtol=1e-4, atol=1e-5)
    shapes = {t.name: onnx.numpy_helper.to_array(t).tolist() for t in small.graph.initializer if "shape" in t.name}
    assert [0, 0, 2, 2] in shapes.values() and not any(v == [0, 0, 4, 2] for v in shapes.values())


def test_removing_all_zero_heads_is_bit_identical() -> None:
    rng = np.random.default_rng(102)  # this function's own data, whatever ran before
    model, _ = attention(heads=4, kv_heads=4, head_dim=2)
    for t in model.graph.initializer:
        if t.name == "wo":
            array = onnx.numpy_helper.to_array(t).copy()
            array[2:4] = 0  # head 1's rows of O: the head contributes nothing
            t.CopyFrom(onnx.numpy_helper.from_array(array, "wo"))
    x = draw(rng, 2, SEQ, 8)
    before = run(model, {"x": x})[0]
    small, _ = _shrink(model, [1])
    np.testing.assert_array_equal(run(small, {"x": x})[0], before)


def test_grouped_query_attention_removes_kv_groups_with_their_query_heads() -> None:
    rng = np.random.default_rng(103)  # this function's own data, whatever ran before
    model, w = attention(heads=4, kv_heads=2, head_dim=2)
    x = draw(rng, 2, SEQ, 8)
    np.testing.assert_allclose(run(model, {"x": x})[0], attention_np(w, x, 4, 2, 2), rtol=1e-4, atol=1e-5)
    small, group = _shrink(model, [0])  # KV group 0: key/value head 0 and query heads 0 and 1
    assert group.width == 1 and group.unit_size == 4  # type: ignore[attr-defined]  # 2 KV groups, 1 left
    expected = attention_np(_drop(w, [0, 1], [0], 2), x, 2, 1, 2)
    np.testing.assert_allclose(run(small, {"x": x})[0], expected, rtol=1e-4, atol=1e-5)


def test_multi_query_attention_offers_no_head_unit_and_says_why() -> None:
    model, _ = attention(heads=4, kv_heads=1, head_dim=2)  # one KV head for four query heads, as Gemma 3 270M
    scan = find_groups(ir.from_proto(model), units=("heads",))
    assert scan.groups == []
    assert [skip.reason for skip in scan.skips] == [ONE_KV_GROUP]


def test_a_head_count_hidden_in_a_dynamic_shape_is_skipped_with_its_reason() -> None:
    model, _ = attention(heads=4, kv_heads=4, head_dim=2)
    for node in model.graph.node:
        if node.op_type == "Reshape" and node.input[1] == "q_shape":  # the head count now comes from a Shape op
            node.input[1] = "dyn"
    model.graph.node.insert(0, helper.make_node("Shape", ["q1_like"], ["dyn"]))
    model.graph.node.insert(0, helper.make_node("Reshape", ["x", "q_shape_x"], ["q1_like"]))
    model.graph.initializer.append(init(np.array([0, 0, 4, 2], np.int64), "q_shape_x"))
    model = onnx.shape_inference.infer_shapes(model)
    scan = find_groups(ir.from_proto(model), ("heads",))
    assert not scan.groups
    assert scan.skips and all(s.reason for s in scan.skips)


@pytest.mark.parametrize("units", [("mlp",), ("heads",)])
def test_unit_kinds_select_what_is_found(units: tuple[str, ...]) -> None:
    model, _ = attention(heads=4, kv_heads=4, head_dim=2)
    kinds = {g.kind for g in find_groups(ir.from_proto(model), units).groups}
    assert kinds == ({"heads"} if units == ("heads",) else set())


INT_MAX, INT_MIN = np.iinfo(np.int64).max, np.iinfo(np.int64).min


def exporter_style(model: onnx.ModelProto, near_miss: bool = False) -> onnx.ModelProto:
    """The dynamo exporter's layout: Q/K/V reshaped to ``[b, s, -1, head_dim]`` with b, s read from a Shape, and
    Kᵀ as Reshape ``[-1, s, hd]`` → Transpose(0, 2, 1) → Reshape ``Shape(k)[:-2] + [hd, s]``, every entry of
    both read at run time from ``Shape(k)``. ``near_miss``: the first Reshape reads ``s`` from ``Shape(q)`` (the
    same number at run time here, but nothing proves it)."""
    graph = model.graph
    consts = {
        "c_m1": [-1],
        "c_0": [0],
        "c_1": [1],
        "c_2": [2],
        "c_m2": [-2],
        "c_max": [INT_MAX],
        "c_min": [INT_MIN],
    }
    graph.initializer.extend(init(np.array(v, np.int64), k) for k, v in consts.items())
    head_dims = {t.name: onnx.numpy_helper.to_array(t)[-1] for t in graph.initializer if t.name.endswith("_shape")}
    new = [
        helper.make_node("Shape", ["x"], ["xs"]),
        helper.make_node("Slice", ["xs", "c_0", "c_1"], ["xb"]),
        helper.make_node("Slice", ["xs", "c_1", "c_2"], ["xsq"]),
    ]
    for name, hd in head_dims.items():
        graph.initializer.append(init(np.array([hd], np.int64), f"{name}_hd"))
        new.append(helper.make_node("Concat", ["xb", "xsq", "c_m1", f"{name}_hd"], [f"{name}_dyn"], axis=0))
    for node in graph.node:
        if node.op_type == "Reshape" and node.input[1] in head_dims:
            node.input[1] = f"{node.input[1]}_dyn"
        if node.op_type == "Transpose" and list(node.attribute[0].ints) == [0, 1, 3, 2]:
            k = node.input[0]
            node.CopyFrom(helper.make_node("Reshape", ["kt_t", "kt_back"], ["kt"], allowzero=0))
            new += [
                helper.make_node("Shape", [k], ["ks"]),
                helper.make_node("Slice", ["ks", "c_m1", "c_max"], ["kt_hd"]),
                helper.make_node("Slice", ["ks", "c_m2", "c_m1"], ["kt_s"]),
                helper.make_node("Slice", ["ks", "c_min", "c_m2"], ["kt_lead"]),
                helper.make_node("Concat", ["c_m1", "q_s" if near_miss else "kt_s", "kt_hd"], ["kt_flat"], axis=0),
                helper.make_node("Reshape", [k, "kt_flat"], ["kt_r"], allowzero=0),
                helper.make_node("Transpose", ["kt_r"], ["kt_t"], perm=[0, 2, 1]),
                helper.make_node("Concat", ["kt_lead", "kt_hd", "kt_s"], ["kt_back"], axis=0),
            ]
            if near_miss:
                new += [
                    helper.make_node("Shape", ["q"], ["qs"]),
                    helper.make_node("Slice", ["qs", "c_m2", "c_m1"], ["q_s"]),
                ]
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(new + nodes)
    topo = ir.from_proto(model)
    TopologicalSortPass()(topo)  # the new nodes read tensors made further down
    model = ir.to_proto(topo)
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize(("heads", "kv_heads", "drop_q", "drop_kv"), [(4, 4, [1, 3], [1, 3]), (4, 2, [0, 1], [0])])
def test_exporter_key_transpose_is_folded_exactly_and_its_heads_removed(
    heads: int, kv_heads: int, drop_q: list[int], drop_kv: list[int]
) -> None:
    rng = np.random.default_rng(104)  # this function's own data, whatever ran before
    from graphprune.graph.prepare import prepare_graph

    dense, w = attention(heads=heads, kv_heads=kv_heads, head_dim=2)
    model = exporter_style(dense)
    x = draw(rng, 3, SEQ, 8)
    before = run(model, {"x": x})[0]
    np.testing.assert_allclose(before, attention_np(w, x, heads, kv_heads, 2), rtol=1e-4, atol=1e-5)
    m = ir.from_proto(model)
    assert not find_groups(m, ("heads",)).groups  # the raw layout: skipped, the head count is read at run time
    prepare_graph(m, heads=True)
    assert sum(n.op_type == "Shape" for n in m.graph) == 1  # Shape(k) and its slices went with the fold
    np.testing.assert_array_equal(run(m, {"x": x})[0], before)  # the fold alone: bit-identical
    scan = find_groups(m, ("heads",))
    assert len(scan.groups) == 1, scan.skips
    units = [0] if kv_heads < heads else [1, 3]
    ShrinkPass([Removal(scan.groups[0], np.array(units))])(m)
    expected = attention_np(_drop(w, drop_q, drop_kv, 2), x, heads - len(drop_q), kv_heads - len(drop_kv), 2)
    np.testing.assert_allclose(run(m, {"x": x})[0], expected, rtol=1e-4, atol=1e-5)


def test_a_key_reshape_not_proven_from_the_keys_own_shape_is_left_alone_and_its_heads_skipped() -> None:
    rng = np.random.default_rng(105)  # this function's own data, whatever ran before
    from graphprune.graph.prepare import fold_key_transposes, prepare_graph

    model = exporter_style(attention(heads=4, kv_heads=4, head_dim=2)[0], near_miss=True)
    m = ir.from_proto(model)
    x = draw(rng, 2, SEQ, 8)
    before = run(m, {"x": x})[0]
    prepare_graph(m, heads=True)
    assert fold_key_transposes(m) == 0
    np.testing.assert_array_equal(run(m, {"x": x})[0], before)
    scan = find_groups(m, ("heads",))
    assert not scan.groups and scan.skips


@pytest.mark.parametrize(
    ("head_dim", "round_to", "ratio", "removed"),
    [(4, 4, 0.25, 1), (4, 8, 0.5, 2), (2, 4, 0.5, 2), (2, 4, 0.25, 0), (2, 8, 0.5, 0)],
)
def test_round_to_counts_channels_so_heads_whose_size_it_divides_go_one_at_a_time(
    head_dim: int, round_to: int, ratio: float, removed: int
) -> None:
    # round_to N keeps every layer's channels a multiple of N: heads of head_dim channels need N / gcd(N, head_dim)
    rng = np.random.default_rng(105)  # this function's own data, whatever ran before
    model, w = attention(heads=4, kv_heads=4, head_dim=head_dim)
    m = ir.from_proto(model)
    report = shrink_model(m, ShrinkConfig(ratio=ratio, units=("heads",), round_to=round_to))
    (record,) = report.groups
    assert len(record.removed) == removed
    assert (record.units_after * head_dim) % round_to == 0 or record.units_after == 4  # too few to round: whole
    x = draw(rng, 2, SEQ, 8)
    gone = list(record.removed)
    expected = attention_np(_drop(w, gone, gone, head_dim), x, 4 - removed, 4 - removed, head_dim)
    np.testing.assert_allclose(run(ir.to_proto(m), {"x": x})[0], expected, rtol=1e-4, atol=1e-5)
