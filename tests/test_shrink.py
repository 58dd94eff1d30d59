"""Structured pruning: every unit kind built as a tiny model, checked against ONNX Runtime and numpy."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphprune.algorithms import structured as st
from graphprune.algorithms.structured import StructuredMethod
from graphprune.calibration.request import CalibrationRequest
from graphprune.errors import GraphpruneError
from graphprune.graph.groups import find_groups
from graphprune.passes.base import PassPreconditionError
from graphprune.passes.shrink import Removal, ShrinkPass
from graphprune.pipeline.shrink import ShrinkConfig, shrink_model
from tests.onnx_builders import (
    Net,
    bert_mlp,
    draw,
    gelu_erf,
    gemm_mlp,
    gemma_mlp,
    init,
    llama_mlp,
    make_model,
    residual_stack,
    run,
    silu,
    tensor,
)


def _conv_np(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """3x3 convolution, stride 1, padding 1, NCHW."""
    n, _, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], h, wd), dtype=np.float64)
    for i in range(3):
        for j in range(3):
            out += np.einsum("nchw,oc->nohw", xp[:, :, i : i + h, j : j + wd], w[:, :, i, j])
    if b is not None:
        out += b[None, :, None, None]
    return out.astype(np.float32)


def cnn(cin: int = 3, mid: int = 6, cout: int = 4) -> Net:
    """Conv → BatchNormalization → Relu → Conv: the first Conv's filters are the units."""
    rng = np.random.default_rng(3)  # this function's own data, whatever ran before
    w = {
        "c1": draw(rng, mid, cin, 3, 3),
        "c1b": draw(rng, mid),
        "scale": (1 + draw(rng, mid, scale=0.1)),
        "shift": draw(rng, mid),
        "mean": draw(rng, mid),
        "var": np.abs(draw(rng, mid)) + 0.5,
        "c2": draw(rng, cout, mid, 3, 3),
        "c2b": draw(rng, cout),
    }
    nodes = [
        helper.make_node("Conv", ["x", "c1", "c1b"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["a", "scale", "shift", "mean", "var"], ["n"], epsilon=1e-5),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("Conv", ["r", "c2", "c2b"], ["y"], pads=[1, 1, 1, 1]),
    ]
    model = make_model(
        nodes,
        [tensor("x", shape=[2, cin, 5, 5])],
        [tensor("y", shape=[2, cout, 5, 5])],
        [init(v, k) for k, v in w.items()],
    )

    def forward(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
        a = _conv_np(x, p["c1"], p["c1b"])
        inv = p["scale"] / np.sqrt(p["var"] + 1e-5)
        n = (a - p["mean"][None, :, None, None]) * inv[None, :, None, None] + p["shift"][None, :, None, None]
        return _conv_np(np.maximum(n, 0), p["c2"], p["c2b"])

    axes = {"c1": 0, "c1b": 0, "scale": 0, "shift": 0, "mean": 0, "var": 0, "c2": 1}
    return Net(model, w, {"x": draw(rng, 2, cin, 5, 5, scale=1.0)}, forward, axes)


NETS = {"llama_mlp": llama_mlp, "gemma_mlp": gemma_mlp, "bert_mlp": bert_mlp, "gemm_mlp": gemm_mlp, "cnn": cnn}


def _shrunk(model: onnx.ModelProto, units: list[int]) -> onnx.ModelProto:
    m = ir.from_proto(model)
    scan = find_groups(m)
    assert len(scan.groups) == 1, scan.skips
    ShrinkPass([Removal(scan.groups[0], np.array(units))])(m)
    return ir.to_proto(m)


def _sliced(net: Net, units: list[int]) -> dict[str, np.ndarray]:
    return {
        k: np.delete(v, units, axis=net.channel_axes[k]) if k in net.channel_axes else v
        for k, v in net.weights.items()
    }


@pytest.mark.parametrize("kind", sorted(NETS))
def test_one_group_found_with_every_coupled_tensor(kind: str) -> None:
    net = NETS[kind]()
    scan = find_groups(ir.from_proto(net.model))
    assert len(scan.groups) == 1
    group = scan.groups[0]
    assert {s.value.name: s.axis for s in group.slots} == net.channel_axes
    assert group.kind == ("channels" if kind == "cnn" else "mlp")


@pytest.mark.parametrize("kind", sorted(NETS))
def test_removing_all_zero_channels_is_bit_identical(kind: str) -> None:
    net = NETS[kind]()
    units = [1, 4]
    zeroed = onnx.ModelProto()
    zeroed.CopyFrom(net.model)
    for t in zeroed.graph.initializer:
        if t.name in net.channel_axes and net.channel_axes[t.name] is not None:
            array = onnx.numpy_helper.to_array(t).copy()
            index = [slice(None)] * array.ndim
            index[net.channel_axes[t.name]] = units  # type: ignore[call-overload]
            if t.name in ("scale", "var"):
                continue  # BatchNormalization's scale and variance: any value, the consumer rows are zero
            array[tuple(index)] = 0
            t.CopyFrom(onnx.numpy_helper.from_array(array, t.name))
    before = run(zeroed, net.feed)[0]
    after = run(_shrunk(zeroed, units), net.feed)[0]
    np.testing.assert_array_equal(after, before)


@pytest.mark.parametrize("kind", sorted(NETS))
def test_removing_real_channels_equals_numpy_of_the_smaller_network(kind: str) -> None:
    net = NETS[kind]()
    units = [0, 3]
    small = _shrunk(net.model, units)
    expected = net.forward(_sliced(net, units), *net.feed.values())  # type: ignore[operator]
    np.testing.assert_allclose(run(small, net.feed)[0], expected, rtol=1e-4, atol=1e-5)
    onnx.checker.check_model(small)
    sizes = {t.name: tuple(t.dims) for t in small.graph.initializer}
    for name, axis in net.channel_axes.items():
        assert sizes[name][axis] == net.weights[name].shape[axis] - 2


def test_flap_compensation_equals_the_mean_contribution_it_replaces() -> None:
    rng = np.random.default_rng(4)  # this function's own data, whatever ran before
    net = bert_mlp()
    calib = {"x": draw(rng, 64, 8, scale=1.0)}
    m = ir.from_proto(net.model)
    report = shrink_model(
        m,
        ShrinkConfig(ratio=0.25, method=StructuredMethod.FLAP, refit=False),
        CalibrationRequest(data=calib, batch_size=16),
    )
    (record,) = report.groups
    removed = record.removed
    assert len(removed) == 4 and record.compensated
    # numpy: the consumer's input on the calibration data, its removed channels' mean contribution
    g = gelu_erf(calib["x"] @ net.weights["w1"] + net.weights["b1"])
    contribution = (g[:, removed] @ net.weights["w2"][removed]).mean(axis=0)
    b2 = next(v for k, v in m.graph.initializers.items() if k == "b2").const_value.numpy()
    np.testing.assert_allclose(b2 - net.weights["b2"], contribution, rtol=1e-4, atol=1e-6)
    # and FLAP ranks by Var(X_j)·‖W_j,:‖²
    variance = g.astype(np.float64).var(axis=0)
    score = variance * (net.weights["w2"].astype(np.float64) ** 2).sum(axis=1)
    assert sorted(removed) == sorted(np.argsort(score)[:4].tolist())
    # the mean of the shrunk model's output on the calibration data is the dense one's
    dense = run(net.model, calib)[0].mean(axis=0)
    shrunk = run(ir.to_proto(m), calib)[0].mean(axis=0)
    np.testing.assert_allclose(shrunk, dense, rtol=1e-4, atol=1e-5)


def test_flap_adds_a_bias_where_the_consumer_has_none() -> None:
    rng = np.random.default_rng(5)  # this function's own data, whatever ran before
    net = llama_mlp()
    calib = {"x": draw(rng, 4, 16, 8, scale=1.0)}
    m = ir.from_proto(net.model)
    report = shrink_model(
        m,
        ShrinkConfig(ratio=0.5, method=StructuredMethod.FLAP, refit=False),
        CalibrationRequest(data=calib, batch_size=2),
    )
    removed = report.groups[0].removed
    x = calib["x"].reshape(-1, 8)
    h = silu(x @ net.weights["gate"]) * (x @ net.weights["up"])
    contribution = (h[:, removed] @ net.weights["down"][removed]).mean(axis=0)
    keep = _sliced(net, removed)
    expected = net.forward(keep, net.feed["x"]) + contribution  # type: ignore[operator]
    np.testing.assert_allclose(run(ir.to_proto(m), net.feed)[0], expected, rtol=1e-4, atol=1e-5)
    # the report counts the new bias: the three sliced weights plus one value per output
    assert report.parameters_after == sum(v.size for v in keep.values()) + 8


def test_wanda_ranks_by_activation_norm_times_weight_magnitude() -> None:
    rng = np.random.default_rng(6)  # this function's own data, whatever ran before
    net = llama_mlp()
    calib = {"x": draw(rng, 4, 16, 8, scale=1.0)}
    m = ir.from_proto(net.model)
    report = shrink_model(
        m, ShrinkConfig(ratio=0.25, method=StructuredMethod.WANDA), CalibrationRequest(data=calib, batch_size=4)
    )
    x = calib["x"].reshape(-1, 8).astype(np.float64)
    h = silu(x @ net.weights["gate"]) * (x @ net.weights["up"])
    score = np.sqrt((h**2).sum(axis=0)) * np.abs(net.weights["down"]).sum(axis=1)
    assert report.groups[0].removed == sorted(np.argsort(score)[:3].tolist())


def test_l2_ranks_by_the_group_norm_and_keeps_the_earlier_unit_on_ties() -> None:
    net = gemm_mlp()
    w = net.weights
    norm = (w["w1"].astype(np.float64) ** 2).sum(axis=1) + (w["w2"].astype(np.float64) ** 2).sum(axis=0)
    m = ir.from_proto(net.model)
    report = shrink_model(m, ShrinkConfig(ratio=0.3))
    assert report.groups[0].removed == sorted(np.argsort(norm)[:3].tolist())
    assert st.units_to_remove(np.array([1.0, 0.5, 1.0, 0.5]), 1).tolist() == [3]


def test_steps_reach_the_ratio_in_rounds() -> None:
    rng = np.random.default_rng(7)  # this function's own data, whatever ran before
    net = llama_mlp(hidden=16)
    calib = {"x": draw(rng, 4, 16, 8, scale=1.0)}
    m = ir.from_proto(net.model)
    report = shrink_model(
        m,
        ShrinkConfig(ratio=0.5, method=StructuredMethod.WANDA, steps=2, refit=False),
        CalibrationRequest(data=calib, batch_size=4),
    )
    assert report.groups[0].units_after == 8 and len(set(report.groups[0].removed)) == 8
    expected = net.forward(_sliced(net, report.groups[0].removed), net.feed["x"])  # type: ignore[operator]
    np.testing.assert_allclose(run(ir.to_proto(m), net.feed)[0], expected, rtol=1e-4, atol=1e-5)


def test_a_channel_read_by_another_op_is_skipped_with_its_reason() -> None:
    net = llama_mlp()
    model = net.model
    model.graph.node.append(helper.make_node("ReduceMean", ["h"], ["hm"], axes=[-1]))
    model.graph.output.append(tensor("hm", shape=None))
    scan = find_groups(ir.from_proto(model))
    assert not scan.groups
    assert any("ReduceMean" in s.reason for s in scan.skips)


def test_a_shared_weight_is_skipped() -> None:
    net = gemm_mlp()
    net.model.graph.node.append(helper.make_node("Identity", ["w1"], ["w1_copy"]))
    net.model.graph.output.append(tensor("w1_copy", shape=None))
    scan = find_groups(ir.from_proto(net.model))
    assert not scan.groups and any("shared" in s.reason for s in scan.skips)


def test_blocks_with_the_lowest_influence_are_bypassed_and_their_weights_deleted() -> None:
    rng = np.random.default_rng(9)  # this function's own data, whatever ran before
    model, _, forward = residual_stack(small=1)
    calib = {"x": draw(rng, 32, 8, scale=1.0)}
    m = ir.from_proto(model)
    report = shrink_model(m, ShrinkConfig(blocks=1), CalibrationRequest(data=calib, batch_size=8))
    assert [b.index for b in report.blocks if b.removed] == [1]
    # influence is 1 - cos(block input, block output), averaged over rows
    x1 = forward(calib["x"], {1, 2})
    x2 = forward(calib["x"], {2})
    cos = (x1 * x2).sum(1) / np.linalg.norm(x1, axis=1) / np.linalg.norm(x2, axis=1)
    assert report.blocks[1].influence == pytest.approx(float(np.mean(1 - cos)), rel=1e-3)
    small = ir.to_proto(m)
    assert {t.name for t in small.graph.initializer} == {"w1_0", "w2_0", "w1_2", "w2_2", "two"}
    feed = {"x": draw(rng, 5, 8, scale=1.0)}
    np.testing.assert_allclose(run(small, feed)[0], forward(feed["x"], {1}), rtol=1e-5, atol=1e-5)
    assert report.parameters_after == report.parameters_before - 2 * 8 * 12


def test_block_removal_of_the_last_block_keeps_the_output_name() -> None:
    rng = np.random.default_rng(10)  # this function's own data, whatever ran before
    model, _, forward = residual_stack(small=2)
    model.graph.node.pop()  # the last Add writes the output directly
    model.graph.node[-1].output[0] = "y"
    m = ir.from_proto(model)
    calib = {"x": draw(rng, 16, 8, scale=1.0)}
    shrink_model(m, ShrinkConfig(blocks=1), CalibrationRequest(data=calib, batch_size=8))
    small = ir.to_proto(m)
    assert [o.name for o in small.graph.output] == ["y"]
    feed = {"x": draw(rng, 3, 8, scale=1.0)}
    np.testing.assert_allclose(run(small, feed)[0], forward(feed["x"], {2}) / 2, rtol=1e-5, atol=1e-5)


def test_flap_on_a_conv_chain_adds_biases_that_shrink_with_the_next_group() -> None:
    """Conv → Relu → Conv(no bias) → Relu → Conv: the middle Conv gets a bias and loses output channels too."""
    rng = np.random.default_rng(11)  # this function's own data, whatever ran before
    w = {"c1": draw(rng, 6, 2, 3, 3), "c2": draw(rng, 6, 6, 3, 3), "c3": draw(rng, 3, 6, 3, 3)}
    nodes = [
        helper.make_node("Conv", ["x", "c1"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ra"]),
        helper.make_node("Conv", ["ra", "c2"], ["b"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["b"], ["rb"]),
        helper.make_node("Conv", ["rb", "c3"], ["y"], pads=[1, 1, 1, 1]),
    ]
    model = make_model(
        nodes,
        [tensor("x", shape=["n", 2, 4, 4])],
        [tensor("y", shape=["n", 3, 4, 4])],
        [init(v, k) for k, v in w.items()],
    )
    m = ir.from_proto(model)
    calib = {"x": draw(rng, 8, 2, 4, 4, scale=1.0)}
    report = shrink_model(
        m,
        ShrinkConfig(ratio=0.5, method=StructuredMethod.FLAP, allocate="uniform"),
        CalibrationRequest(data=calib, batch_size=4),
    )
    assert [len(g.removed) for g in report.groups] == [3, 3]
    small = ir.to_proto(m)
    onnx.checker.check_model(small)
    assert run(small, {"x": calib["x"][:1]})[0].shape == (1, 3, 4, 4)
    shapes = {t.name: tuple(t.dims) for t in small.graph.initializer}
    assert shapes["c2"] == (3, 3, 3, 3) and sorted(v for k, v in shapes.items() if "bias" in k) == [(3,), (3,)]


def test_removal_count_and_units_helpers() -> None:
    assert st.removal_count(1536, 0.25) == 384
    assert st.channels_of_units(np.array([0, 2]), 3).tolist() == [0, 1, 2, 6, 7, 8]
    with pytest.raises(ValueError):
        st.units_to_remove(np.zeros(3), 3)
    assert TensorProto.FLOAT  # the builders' element type


def test_round_to_leaves_a_multiple_of_n_units_in_every_group() -> None:
    # the nearest multiple of 8 to what the ratio leaves; groups of 8 units or fewer stay whole
    assert [st.removal_count(n, 0.3, 8) for n in (1536, 22, 16, 8, 6)] == [464, 6, 8, 0, 0]
    assert st.removal_count(100, 0.0, 8) == 0 and st.removal_count(100, 0.3, 1) == 30
    net = llama_mlp(hidden=24)
    m = ir.from_proto(net.model)
    report = shrink_model(m, ShrinkConfig(ratio=0.25, round_to=8))  # 18 left by the ratio: 16 by the multiple
    (record,) = report.groups
    assert record.units_after == 16 and len(record.removed) == 8
    expected = net.forward(_sliced(net, record.removed), net.feed["x"])  # type: ignore[operator]
    np.testing.assert_allclose(run(ir.to_proto(m), net.feed)[0], expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(GraphpruneError, match="`round_to`"):
        ShrinkConfig(ratio=0.25, round_to=0).validate()


def test_per_layer_ratios_override_the_uniform_one_by_group_name() -> None:
    model, _, _ = residual_stack(hidden=12)
    m = ir.from_proto(model)
    config = ShrinkConfig(ratio=0.25, overrides=(("mlp into w2_0", 0.5), ("*w2_2", 0.0)))
    report = shrink_model(m, config)
    assert {g.name: len(g.removed) for g in report.groups} == {
        "mlp into w2_0": 6,
        "mlp into w2_1": 3,
        "mlp into w2_2": 0,
    }


def test_a_post_norm_block_is_bypassed_with_its_norm() -> None:
    """BERT-style x -> LayerNorm(x + f(x)): the norm belongs to the block, the last block's too."""
    rng = np.random.default_rng(12)  # this function's own data, whatever ran before
    model, _, forward = residual_stack(small=2, post_norm=True)
    m = ir.from_proto(model)
    calib = {"x": draw(rng, 32, 8, scale=1.0)}
    report = shrink_model(m, ShrinkConfig(blocks=1), CalibrationRequest(data=calib, batch_size=8))
    assert [b.index for b in report.blocks if b.removed] == [2]
    feed = {"x": draw(rng, 4, 8, scale=1.0)}
    np.testing.assert_allclose(run(ir.to_proto(m), feed)[0], forward(feed["x"], {2}), rtol=1e-4, atol=1e-4)


def test_shrink_pass_is_an_onnx_ir_pass_with_conditions() -> None:
    net = llama_mlp()
    m = ir.from_proto(net.model)
    (group,) = find_groups(m).groups
    assert isinstance(ShrinkPass([]), ir.passes.InPlacePass)
    for units, needle in (([12], "outside"), ([1, 1], "twice"), (list(range(12)), "cannot remove all")):
        with pytest.raises(PassPreconditionError, match=needle):
            ShrinkPass([Removal(group, np.array(units))])(m)
    result = ir.passes.Sequential(ShrinkPass([Removal(group, np.array([2, 5]))]))(m)
    assert result.modified and result.model is m and group.width == 10
    expected = net.forward(_sliced(net, [2, 5]), net.feed["x"])  # type: ignore[operator]
    np.testing.assert_allclose(run(ir.to_proto(m), net.feed)[0], expected, rtol=1e-4, atol=1e-5)
    other = ir.from_proto(net.model)  # a group found in one model is refused by another
    with pytest.raises(PassPreconditionError, match="not in this model"):
        ShrinkPass([Removal(group, np.array([0]))])(other)


def test_moments_run_on_a_weightless_session_model_and_equal_numpy() -> None:
    rng = np.random.default_rng(13)  # this function's own data, whatever ran before
    from graphprune.calibration.moments import ChannelTap, _moment_taps, collect_moments
    from graphprune.calibration.taps import tapped_model

    net = bert_mlp(d=64, hidden=256)  # 128 KiB of weights
    m = ir.from_proto(net.model)
    calib = {"x": draw(rng, 48, 64, scale=1.0)}
    taps = [ChannelTap("g", -1, 256)]
    with _moment_taps(m, taps, [("x", "y")]) as (plan, _, _):
        session = tapped_model(m, plan)
    weight_bytes = sum(v.const_value.nbytes for v in m.graph.initializers.values())  # type: ignore[union-attr]
    assert session.proto.ByteSize() < weight_bytes / 10  # the weights travel as OrtValues, not in the protobuf
    assert not any(n.name and "graphprune" in n.name for n in m.graph)  # the taps are gone from the model again
    moments = collect_moments(m, taps, [("x", "y")], CalibrationRequest(data=calib, batch_size=16))
    w = net.weights
    g = gelu_erf(calib["x"] @ w["w1"] + w["b1"]).astype(np.float64)
    np.testing.assert_allclose(moments.sums["g"], g.sum(0), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(moments.sumsq["g"], (g**2).sum(0), rtol=1e-4)
    assert moments.rows["g"] == 48
    y = g @ w["w2"] + w["b2"]
    cos = (calib["x"] * y).sum(1) / np.linalg.norm(calib["x"], axis=1) / np.linalg.norm(y, axis=1)
    np.testing.assert_allclose(moments.influence(("x", "y")), np.mean(1 - cos), rtol=1e-4)
