"""SmoothQuant folds: exact on the float model (ONNX Runtime outputs equal), N:M kept, scales as the paper's."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from graphprune.calibration.request import CalibrationRequest
from graphprune.quantize.config import QuantizeConfig
from graphprune.quantize.ranges import collect_ranges
from graphprune.quantize.select import plan_quantization
from graphprune.quantize.smooth import smooth
from tests.onnx_builders import init, normed_mlp, reference_nm_mask, run

D, H = 16, 32


def sparse(shape: tuple[int, int], seed: int) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return w * reference_nm_mask(w, 0, 2, 4)


def block(norm: str) -> onnx.ModelProto:
    """norm(x) -> gate/up -> SiLU(gate) * up -> down -> + x: a LLaMA MLP (RMSNorm as Mul by g) or LayerNorm."""
    rng = np.random.default_rng(5400)  # this function's own data, whatever ran before
    g = rng.uniform(0.5, 2.0, D).astype(np.float32)
    b = rng.standard_normal(D).astype(np.float32)
    if norm == "rms":
        first = [helper.make_node("Mul", ["x", "g"], ["n"])]
        params = [init(g, "g")]
    else:
        first = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["n"], axis=-1)]
        params = [init(g, "g"), init(b, "b")]
    weights = {"Wg": sparse((D, H), 1), "Wu": sparse((D, H), 2), "Wd": sparse((H, D), 3)}
    return normed_mlp(first, params, weights)


def smoothed(model: onnx.ModelProto, calib: np.ndarray, alpha: float):  # type: ignore[no-untyped-def]
    m = ir.from_proto(model)
    plan = plan_quantization(m, QuantizeConfig(include_head=True))
    ranges, _ = collect_ranges(m, plan.activations, CalibrationRequest(data={"x": calib}))
    before = {k: (r.lo.copy(), r.hi.copy()) for k, r in ranges.items()}
    records, _ = smooth(m, plan.targets, ranges, alpha)
    return m, records, ranges, before


def test_smoothing_is_exact_and_keeps_the_pattern() -> None:
    rng = np.random.default_rng(5405)  # this function's own data, whatever ran before
    for norm in ("rms", "layer"):
        model = block(norm)
        calib = (rng.standard_normal((8, 4, D)) * rng.uniform(0.1, 20, D)).astype(np.float32)  # outlier channels
        m, records, _, _ = smoothed(model, calib, 0.5)
        assert {r.activation for r in records if r.smoothed} == {"n", "h"}, records
        x = (rng.standard_normal((3, 4, D)) * 5).astype(np.float32)
        got, want = run(m, {"x": x})[0], run(model, {"x": x})[0]
        # float32 rounding of outputs up to ~1e3: an element that cancels to near zero is judged on the scale
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6 * float(np.abs(want).max()))
        for name in ("Wg", "Wu", "Wd"):
            original = next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)
            now = m.graph.initializers[name].const_value.numpy()
            np.testing.assert_array_equal(now == 0, original == 0)
            assert not np.allclose(now, original)  # the K rows (and up's columns) moved


def test_scales_follow_smoothquant_and_ranges_shrink_with_them() -> None:
    rng = np.random.default_rng(5402)  # this function's own data, whatever ran before
    model = block("rms")
    calib = (rng.standard_normal((8, 4, D)) * rng.uniform(0.1, 20, D)).astype(np.float32)
    wg = next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "Wg")
    wu = next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "Wu")
    g = next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "g")
    m, _, ranges, before = smoothed(model, calib, 0.7)
    x_absmax = np.abs(calib * g).reshape(-1, D).max(axis=0)
    w_absmax = np.maximum(np.abs(wg).max(axis=1), np.abs(wu).max(axis=1))
    s = x_absmax**0.7 / w_absmax**0.3
    np.testing.assert_allclose(m.graph.initializers["g"].const_value.numpy(), g / s, rtol=1e-5)
    np.testing.assert_allclose(m.graph.initializers["Wg"].const_value.numpy(), wg * s[:, None], rtol=1e-5)
    np.testing.assert_allclose(ranges["n"].hi, before["n"][1] / s, rtol=1e-5)


def test_activation_read_elsewhere_is_not_smoothed() -> None:
    rng = np.random.default_rng(5403)  # this function's own data, whatever ran before
    model = block("rms")
    model.graph.node.append(helper.make_node("Add", ["n", "y"], ["y2"]))  # n also reaches an output directly
    model.graph.output[0].name = "y2"
    _, records, _, _ = smoothed(model, rng.standard_normal((4, 4, D)).astype(np.float32), 0.5)
    record = next(r for r in records if r.activation == "n")
    assert not record.smoothed and "Add" in record.fold
