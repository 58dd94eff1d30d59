"""Issue 12 (10): a weight shared by several MatMuls, some through Identity (cross-layer sharing, as in ALBERT),
is one target when the consumers agree on K; its statistics are the sum over its consumers."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir

from graphprune.algorithms.pattern import NMPattern
from graphprune.algorithms.scores import Method
from graphprune.calibration import CalibrationRequest, calibrate
from graphprune.graph.targets import find_targets
from graphprune.passes.prune import PruneConfig, PrunePass
from tests.onnx_builders import init, reference_nm_mask, run

SHARED_THROUGH_IDENTITY = """
<ir_version: 8, opset_import: ["" : 17]>
agraph (float[3,8] x) => (float[3,8] y) {
  a = MatMul(x, w)
  r = Relu(a)
  w_layer2 = Identity(w)
  y = MatMul(r, w_layer2)
}
"""

SHARED_THROUGH_TRANSPOSE = """
<ir_version: 8, opset_import: ["" : 17]>
agraph (float[3,8] x) => (float[3,8] y) {
  a = MatMul(x, w)
  wt = Transpose <perm = [1, 0]> (w)
  y = MatMul(a, wt)
}
"""


def shared(text: str, w: np.ndarray) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    model.graph.initializer.append(init(w, "w"))
    return model


def test_consumers_agreeing_through_identity_are_one_target() -> None:
    rng = np.random.default_rng(1000)  # this function's own data, whatever ran before
    w = rng.standard_normal((8, 8)).astype(np.float32)
    model = ir.from_proto(shared(SHARED_THROUGH_IDENTITY, w))
    (target,) = find_targets(model).targets
    assert target.k_axis == 0 and [c.activation for c in target.consumers] == ["x", "r"]
    result = PrunePass(config=PruneConfig(NMPattern(2, 4), include_head=True))(model)
    assert [r.name for r in result.pruned] == ["w"]
    wm = np.where(reference_nm_mask(w, 0, 2, 4), w, 0)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_allclose(run(model, {"x": x})[0], np.maximum(x @ wm, 0) @ wm, rtol=1e-5, atol=1e-5)


def test_consumers_that_see_other_axes_as_k_still_disagree() -> None:
    rng = np.random.default_rng(1001)  # this function's own data, whatever ran before
    model = ir.from_proto(shared(SHARED_THROUGH_TRANSPOSE, rng.standard_normal((8, 8)).astype(np.float32)))
    scan = find_targets(model)
    assert scan.targets == [] and "disagree" in scan.skips[0].reason


def test_statistics_of_a_shared_weight_sum_over_its_consumers() -> None:
    rng = np.random.default_rng(1002)  # this function's own data, whatever ran before
    w = rng.standard_normal((8, 8)).astype(np.float32)
    proto = shared(SHARED_THROUGH_IDENTITY, w)
    targets = find_targets(ir.from_proto(proto)).targets
    x = rng.standard_normal((3, 8)).astype(np.float32)
    stats = calibrate(proto, CalibrationRequest([{"x": x}]), targets)
    r = np.maximum(x @ w, 0)
    np.testing.assert_allclose(stats.sumsq["w"], (x**2).sum(0) + (r**2).sum(0), rtol=1e-5)
    model = ir.from_proto(proto)
    PrunePass(config=PruneConfig(NMPattern(2, 4), method=Method.WANDA, include_head=True), stats=stats)(model)
    norms = np.sqrt((x**2).sum(0) + (r**2).sum(0))
    expected = np.where(reference_nm_mask(np.abs(w) * norms[:, None], 0, 2, 4), w, 0)
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(), expected)
