"""CNN units of MobileNetV3-style exports: depthwise Conv, HardSwish as Clip, squeeze-excitation, Resize, pools.

One tiny block as PaddlePaddle's exporter writes it (Constant-node weights, a bias reshaped to [1, C, 1, 1] at
run time): checked against ONNX Runtime (zero channels removed: bit-identical) and numpy (the smaller network).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from graphprune.algorithms.structured import StructuredMethod
from graphprune.calibration.request import CalibrationRequest
from graphprune.graph.groups import find_groups
from graphprune.graph.prepare import prepare_graph
from graphprune.passes.shrink import Removal, ShrinkPass
from graphprune.pipeline.shrink import ShrinkConfig, shrink_model
from tests.mobilenet_models import CIN, HW, C, block_np, mobilenet_block, mobilenet_weights
from tests.onnx_builders import draw, run

# the weights that carry each group's channels, and on which axis
MAIN = {
    "c1": 0,
    "scale": 0,
    "shift": 0,
    "mean": 0,
    "var": 0,
    "dw": 0,
    "dwb": 0,
    "se1": 1,
    "se2": 0,
    "se2b": 0,
    "c2": 1,
}
SQUEEZE = {"se1": 0, "se1b": 0, "se2": 1}
FOLDED = {"se1b_r": "se1b", "se2b_r": "se2b"}  # a bias reshaped to [1, C, 1, 1], folded: its channels on axis 1


def _sliced(w: dict[str, np.ndarray], axes: dict[str, int], units: list[int]) -> dict[str, np.ndarray]:
    return {k: np.delete(v, units, axis=axes[k]) if k in axes else v for k, v in w.items()}


def _prepared(model: onnx.ModelProto) -> ir.Model:
    m = ir.from_proto(model)
    prepare_graph(m)
    return m


def _groups(m: ir.Model) -> dict[str, object]:
    scan = find_groups(m, ("channels",))
    assert len(scan.groups) == 2, scan.skips
    return {"main" if g.width == C else "squeeze": g for g in scan.groups}


X = draw(np.random.default_rng(3), 2, CIN, HW, HW, scale=1.0)  # one input for every test, drawn at import


def test_the_block_matches_its_numpy_forward() -> None:
    w = mobilenet_weights()
    np.testing.assert_allclose(run(mobilenet_block(w), {"x": X})[0], block_np(w, X), rtol=1e-4, atol=1e-5)


def test_prepare_lifts_constant_nodes_and_folds_the_bias_reshapes_exactly() -> None:
    model = mobilenet_block(mobilenet_weights())
    m = _prepared(model)
    assert not any(n.op_type in ("Constant", "Reshape") for n in m.graph)
    assert m.graph.initializers["se2b_r"].const_value.shape == (1, C, 1, 1)
    np.testing.assert_array_equal(run(m, {"x": X})[0], run(model, {"x": X})[0])


def test_both_groups_found_with_every_coupled_tensor() -> None:
    groups = _groups(_prepared(mobilenet_block(mobilenet_weights())))
    for group, axes in ((groups["main"], MAIN), (groups["squeeze"], SQUEEZE)):
        found = {FOLDED.get(s.value.name, s.value.name): s.axis for s in group.slots}  # type: ignore[attr-defined]
        assert found == {k: 1 if f"{k}_r" in FOLDED else v for k, v in axes.items()}
    main = groups["main"]
    assert [n.op_type for n in main.depthwise] == ["Conv"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("which", ["main", "squeeze"])
def test_removing_all_zero_channels_is_bit_identical(which: str) -> None:
    # Trailing channels: ONNX Runtime's 1x1 Conv of a [N, C, 1, 1] tensor (the SE squeeze) vectorises the sum over
    # C, so zeros in the middle would move the other terms to other lanes and change the rounding by an ulp.
    # Arbitrary channels are checked against numpy below.
    units = [4, 5] if which == "main" else [2]
    axes = MAIN if which == "main" else SQUEEZE
    w = mobilenet_weights()
    for name, axis in axes.items():
        if name not in ("scale", "var"):  # BatchNormalization's scale and variance: any value
            index = [slice(None)] * w[name].ndim
            index[axis] = units  # type: ignore[call-overload]
            w[name][tuple(index)] = 0
    model = mobilenet_block(w)
    m = _prepared(model)
    ShrinkPass([Removal(_groups(m)[which], np.array(units))])(m)  # type: ignore[arg-type]
    np.testing.assert_array_equal(run(m, {"x": X})[0], run(model, {"x": X})[0])


def test_removing_real_channels_equals_numpy_of_the_smaller_network() -> None:
    w = mobilenet_weights()
    m = _prepared(mobilenet_block(w))
    groups = _groups(m)
    ShrinkPass([Removal(groups["main"], np.array([0, 3])), Removal(groups["squeeze"], np.array([1]))])(m)  # type: ignore[arg-type]
    small = _sliced(_sliced(w, MAIN, [0, 3]), SQUEEZE, [1])
    proto = ir.to_proto(m)
    onnx.checker.check_model(proto)
    np.testing.assert_allclose(run(proto, {"x": X})[0], block_np(small, X), rtol=1e-4, atol=1e-5)
    depthwise = next(n for n in proto.graph.node if n.op_type == "Conv" and n.input[1] == "dw")
    assert helper.get_attribute_value(next(a for a in depthwise.attribute if a.name == "group")) == C - 2


def test_a_depthwise_conv_with_a_channel_multiplier_is_skipped_with_its_reason() -> None:
    rng = np.random.default_rng(301)  # this function's own data, whatever ran before
    w = mobilenet_weights()
    model = mobilenet_block(w, constant_nodes=False)
    for t in model.graph.initializer:
        if t.name == "dw":  # two filters per input channel: output channel 2c+k reads input channel c
            t.CopyFrom(onnx.numpy_helper.from_array(draw(rng, 2 * C, 1, 3, 3), "dw"))
    scan = find_groups(_prepared(model), ("channels",))
    assert all(g.width != C for g in scan.groups)
    assert any("Conv" in s.reason for s in scan.skips)


def test_a_resize_that_scales_the_channels_is_skipped() -> None:
    model = mobilenet_block(mobilenet_weights(), constant_nodes=False)
    for t in model.graph.initializer:
        if t.name == "scales":
            t.CopyFrom(onnx.numpy_helper.from_array(np.array([1, 2, 2, 2], np.float32), "scales"))
    scan = find_groups(_prepared(model), ("channels",))
    assert all(g.width != C for g in scan.groups)
    assert any("Resize" in s.reason for s in scan.skips)


def test_flap_folds_the_removed_channels_mean_contribution_into_the_last_conv() -> None:
    rng = np.random.default_rng(302)  # this function's own data, whatever ran before
    w = mobilenet_weights()
    model = mobilenet_block(w)
    calib = {"x": draw(rng, 16, CIN, HW, HW, scale=1.0)}
    m = ir.from_proto(model)
    report = shrink_model(
        m,
        ShrinkConfig(
            ratio=0.34, units=("channels",), method=StructuredMethod.FLAP, refit=False, allocate="uniform"
        ),
        CalibrationRequest(data=calib, batch_size=8),
    )
    main = next(r for r in report.groups if r.units_before == C)
    assert main.units_after == 4 and main.compensated
    # numpy: the last Conv's input on the calibration data (dense model: one round), the removed channels' mean
    mp = block_np(w, calib["x"], last=False)
    contribution = np.einsum("c,oc->o", mp[:, main.removed].mean(axis=(0, 2, 3)), w["c2"][:, main.removed, 0, 0])
    conv = next(n for n in m.graph if n.op_type == "Conv" and n.inputs[1].name == "c2")
    np.testing.assert_allclose(conv.inputs[2].const_value.numpy(), contribution, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_rapidocr_classifier_shrinks_exactly_against_its_zeroed_twin() -> None:
    """A trained CNN nobody here wrote (PyPI rapidocr-onnxruntime): removing channels of every provable group
    equals the dense model with those channels' consumer weights zeroed."""
    rng = np.random.default_rng(303)  # this function's own data, whatever ran before
    from graphprune import demo
    from graphprune.graph.model_io import load_model

    path = demo.rapidocr_cls()
    m, twin = load_model(path), load_model(path)
    prepare_graph(m)
    prepare_graph(twin)
    scan = find_groups(m, ("channels",))
    assert len(scan.groups) == 25 and [s.reason for s in scan.skips] == ["channels are read by Shape Shape@0"]
    assert any(g.depthwise for g in scan.groups)
    removals = []
    for group, zeroed in zip(scan.groups, find_groups(twin, ("channels",)).groups, strict=True):
        units = np.arange(0, group.width, 3)[: group.width - 1]  # every third channel, one always left
        removals.append(Removal(group, units))
        for slot in zeroed.consumers:
            w = slot.value.const_value.numpy().copy()  # type: ignore[union-attr]
            index = [slice(None)] * w.ndim
            index[slot.axis] = units  # type: ignore[call-overload]
            w[tuple(index)] = 0
            slot.value.const_value = ir.tensor(w, name=slot.value.name)
    ShrinkPass(removals)(m)
    x = rng.standard_normal((2, 3, 48, 192)).astype(np.float32)
    np.testing.assert_allclose(run(m, {"x": x})[0], run(twin, {"x": x})[0], rtol=1e-4, atol=1e-5)
    assert sum(g.width for g in scan.groups) < 0.7 * 1138
