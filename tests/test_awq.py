"""Activation-aware weight scaling (AWQ) and the scale refit, against numpy references: the search's errors
are the layer outputs' squared errors computed from the activations themselves, the chosen alpha is their least,
the fold is exact in ONNX Runtime, the refit is numpy's least-squares solution, and pruned weights stay exactly
zero."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper
from typer.testing import CliRunner

from graphprune.algorithms.awq import ALPHAS, search_scales
from graphprune.algorithms.quant_grid import QuantGrid
from graphprune.algorithms.scale_refit import refit_scales
from graphprune.calibration import calibrate
from graphprune.calibration.request import CalibrationRequest
from graphprune.cli import app
from graphprune.errors import GraphpruneError
from graphprune.quantize.awq import awq
from graphprune.quantize.config import QuantizeConfig
from graphprune.quantize.files import quantize_file
from graphprune.quantize.select import plan_quantization
from tests.onnx_builders import init, normed_mlp, reference_nm_mask, run

D, HID, BLOCK = 64, 128, 32
GRID = QuantGrid(precision="int4", block_size=BLOCK)


def rounded(w: np.ndarray, block: int) -> np.ndarray:
    """int4 round to nearest with zero point 0, blocks along K, written out in numpy (the reference)."""
    out = np.zeros_like(w, dtype=np.float64)
    for start in range(0, w.shape[1], block):
        part = w[:, start : start + block].astype(np.float32)
        scale = int4_scales(part)
        out[:, start : start + block] = np.clip(np.rint(part / scale), -8, 7) * scale
    return out


def int4_scales(part: np.ndarray) -> np.ndarray:
    """One block's scale per row: the largest weight maps to 7 or the most negative one to -8, whichever needs
    the larger step (codes -8..7); 1.0 for an all-zero block."""
    top = part.max(axis=1, keepdims=True) / np.float32(7)
    bottom = -part.min(axis=1, keepdims=True) / np.float32(8)
    scale = np.maximum(top, bottom)
    return np.where(scale > 0, scale, np.float32(1)).astype(np.float32)


def activations(rows: int, k: int, seed: int) -> np.ndarray:
    """Correlated inputs with a few channels 30x the others: AWQ's case."""
    rng = np.random.default_rng(seed)
    magnitude = np.where(np.arange(k) % 7 == 0, 30.0, 1.0)
    return rng.standard_normal((rows, k)) @ (np.eye(k) + 0.3 * rng.standard_normal((k, k))) * magnitude


def pruned(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A canonical (out, K) weight pruned 2:4 along K."""
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return w * reference_nm_mask(w, 1, 2, 4)


def test_search_errors_are_the_output_errors_and_the_least_wins() -> None:
    x = activations(256, D, 1)
    gram = x.T @ x
    weights = [pruned((24, D), 2), pruned((40, D), 3)]
    result = search_scales(weights, gram, GRID)
    magnitude = np.sqrt((x**2).sum(axis=0))
    expected = []
    for alpha in ALPHAS:
        s = magnitude**alpha
        s /= np.sqrt(s.max() * s.min())
        total = 0.0
        for w in weights:
            w_hat = rounded(w * s.astype(np.float32), BLOCK) / s  # what x sees once s is folded
            total += float(np.sum((x @ w.T.astype(np.float64) - x @ w_hat.T) ** 2))
        expected.append(total)
    np.testing.assert_allclose(result.errors, expected, rtol=1e-4)
    assert result.alpha == ALPHAS[int(np.argmin(expected))] and result.alpha > 0  # outliers: scaling pays
    assert result.error < result.unscaled_error == pytest.approx(expected[0], rel=1e-4)
    s = magnitude**result.alpha
    np.testing.assert_allclose(result.scales, s / np.sqrt(s.max() * s.min()), rtol=1e-9)


def test_search_without_outliers_may_keep_the_weights_as_they_are() -> None:
    x = np.random.default_rng(4).standard_normal((256, D))
    gram = x.T @ x
    result = search_scales([pruned((24, D), 5)], gram, GRID)
    assert result.error <= result.unscaled_error
    with pytest.raises(ValueError, match=r"start with 0\.0"):
        search_scales([pruned((24, D), 5)], gram, GRID, alphas=(0.5, 1.0))


@pytest.mark.parametrize("dead", [False, True])
def test_refit_is_the_least_squares_solution_and_never_worse(dead: bool) -> None:
    x = activations(200, D, 6)
    if dead:
        x[:, 3:9] = 0.0  # a rank-deficient Gram: pinv's least-norm solution, still the least squares
    gram = x.T @ x
    w = pruned((12, D), 7)
    scales = (np.abs(w).reshape(12, -1, BLOCK).max(axis=2) / 7).astype(np.float32)
    codes = np.clip(np.rint(w / np.repeat(scales, BLOCK, axis=1)), -7, 7).astype(np.int8)
    new = refit_scales(w, codes, scales, gram, GRID)
    blocks = D // BLOCK
    for r in range(12):
        design = np.zeros((D, blocks))  # column b: the row's codes in block b
        for b in range(blocks):
            design[b * BLOCK : (b + 1) * BLOCK, b] = codes[r, b * BLOCK : (b + 1) * BLOCK]
        lstsq = np.linalg.lstsq(x @ design, x @ w[r].astype(np.float64), rcond=None)[0]
        before = np.sum((x @ (w[r] - design @ scales[r].astype(np.float64))) ** 2)
        after = np.sum((x @ (w[r] - design @ new[r].astype(np.float64))) ** 2)
        best = np.sum((x @ (w[r] - design @ lstsq)) ** 2)
        assert after <= before
        if (lstsq > 0).all():  # the refit takes the least-squares scales (their objective; float32 storage)
            assert after == pytest.approx(best, rel=1e-5)
        else:
            np.testing.assert_array_equal(new[r], scales[r])
    assert (new > 0).all() and new.dtype == np.float32


def test_refit_keeps_a_block_with_no_code() -> None:
    x = activations(100, D, 8)
    w = pruned((4, D), 9)
    w[1, :BLOCK] = 0.0
    scales = np.full((4, D // BLOCK), 0.3, np.float32)
    codes = np.clip(np.rint(w / 0.3), -7, 7).astype(np.int8)
    new = refit_scales(w, codes, scales, x.T @ x, GRID)
    assert new[1, 0] == np.float32(0.3)


def mlp(seed: int = 10) -> onnx.ModelProto:
    """x * g (an RMSNorm's weight) -> gate/up -> silu(gate) * up -> down -> + x, every MatMul 2:4 along K."""
    rng = np.random.default_rng(seed)
    weights = {"Wg": pruned((HID, D), 11).T, "Wu": pruned((HID, D), 12).T, "Wd": pruned((D, HID), 13).T}
    first = [helper.make_node("Mul", ["x", "g"], ["n"])]
    return normed_mlp(first, [init(rng.uniform(0.5, 2.0, D).astype(np.float32), "g")], weights)


def calibration_data() -> np.ndarray:
    return activations(64 * 4, D, 14).reshape(64, 4, D).astype(np.float32)


def test_fold_is_exact_keeps_zeros_and_takes_the_searched_alphas(tmp_path: Path) -> None:
    model = mlp()
    src = tmp_path / "mlp.onnx"
    onnx.save(model, src)
    m = ir.load(src)
    config = QuantizeConfig(precision="int4", block_size=BLOCK, awq=True, include_head=True)
    plan = plan_quantization(m, config)
    stats = calibrate(src, CalibrationRequest(data={"x": calibration_data()}, gram=True), plan.targets)
    records, searched, scales = awq(m, plan.targets, stats, config)
    assert {r.activation for r in records if r.smoothed} == {"n", "h"}
    x = (np.random.default_rng(15).standard_normal((3, 4, D)) * 5).astype(np.float32)
    got, want = run(m, {"x": x})[0], run(model, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6 * float(np.abs(want).max()))
    original = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for name in ("Wg", "Wu", "Wd"):
        now = m.graph.initializers[name].const_value.numpy()  # type: ignore[union-attr]
        np.testing.assert_array_equal(now == 0, original[name] == 0)
    by_activation = {a.activation: a for a in searched}
    for activation, names in (("n", ("Wg", "Wu")), ("h", ("Wd",))):
        gram = stats.gram[names[0]]
        independent = search_scales([original[n].T for n in names], gram, GRID)
        assert by_activation[activation].alpha == independent.alpha
        np.testing.assert_allclose(scales[activation], independent.scales)
    assert by_activation["n"].alpha > 0  # the outlier channels of x reach n


def test_quantize_file_with_awq_and_refit_keeps_the_pattern(tmp_path: Path) -> None:
    src = tmp_path / "mlp.onnx"
    onnx.save(mlp(), src)
    request = CalibrationRequest(data={"x": calibration_data()})
    errors = {}
    for options in ({}, {"awq": True, "refit_scales": True}):
        config = QuantizeConfig(precision="int4", block_size=BLOCK, method="gptq", include_head=True, **options)
        out, report = quantize_file(src, config, tmp_path / f"q{len(options)}.onnx", request, force=True)
        written = ir.load(out).graph
        for name in ("Wg", "Wu", "Wd"):
            codes = written.initializers[name].const_value.numpy().astype(np.int8)  # type: ignore[union-attr]
            before = onnx.numpy_helper.to_array(next(t for t in mlp().graph.initializer if t.name == name))
            np.testing.assert_array_equal(codes == 0, (before == 0) | (codes == 0))  # no pruned weight revived
            assert (codes[before == 0] == 0).all()
        x = calibration_data()[:16]
        errors[bool(options)] = float(np.mean((run(ir.load(out), {"x": x})[0] - run(mlp(), {"x": x})[0]) ** 2))
        assert bool(report.awq) == bool(options)
    assert errors[True] < errors[False]  # on its own calibration data, the scaled and refitted model is closer


def test_awq_options_refused_where_they_do_not_apply(tmp_path: Path) -> None:
    with pytest.raises(GraphpruneError, match="weight-only int4"):
        QuantizeConfig(precision="int8", awq=True).validate()
    src = tmp_path / "mlp.onnx"
    onnx.save(mlp(), src)
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(app, ["quantize", str(src), "--precision", "int8", "--awq", "-o", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert not out.exists()
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=calibration_data())
    args = ["quantize", str(src), "--precision", "int4", "--block-size", "32", "--awq", "--refit-scales"]
    good = CliRunner().invoke(app, [*args, "--include-head", "--calib", str(calib), "-o", str(out), "--json"])
    assert good.exit_code == 0, good.output
    report = json.loads(good.output)
    assert report["config"]["awq"] and {a["activation"] for a in report["awq"]} == {"n", "h"}


def test_sequential_gptq_searches_on_the_base_model_grams(tmp_path: Path) -> None:
    src = tmp_path / "mlp.onnx"
    onnx.save(mlp(), src)
    request = CalibrationRequest(data={"x": calibration_data()}, batch_size=16)
    base = dict(precision="int4", block_size=BLOCK, method="gptq", include_head=True, sequential=True)
    stats_file = tmp_path / "stats.npz"
    m = ir.load(src)
    targets = plan_quantization(m, QuantizeConfig(**base)).targets  # type: ignore[arg-type]
    calibrate(src, CalibrationRequest(data={"x": calibration_data()}, gram=True), targets).save(stats_file)
    with pytest.raises(GraphpruneError, match="drop `stats`"):
        quantize_file(src, QuantizeConfig(**base), tmp_path / "q.onnx", request, stats=stats_file)  # type: ignore[arg-type]
    config = QuantizeConfig(**base, awq=True)  # type: ignore[arg-type]
    out, report = quantize_file(src, config, tmp_path / "q.onnx", request, stats=stats_file)
    stats = calibrate(src, CalibrationRequest(data={"x": calibration_data()}, gram=True), targets)
    original = {t.name: onnx.numpy_helper.to_array(t) for t in mlp().graph.initializer}
    alphas = {a.activation: a.alpha for a in report.awq}
    assert alphas["h"] == search_scales([original["Wd"].T], stats.gram["Wd"], GRID).alpha
    assert {w.method for w in report.result.weights} == {"gptq"} and out.exists()


def test_rtn_refit_writes_the_refit_scales_on_the_rounded_codes(tmp_path: Path) -> None:
    src = tmp_path / "mlp.onnx"
    onnx.save(mlp(), src)
    request = CalibrationRequest(data={"x": calibration_data()})
    config = QuantizeConfig(precision="int4", block_size=BLOCK, refit_scales=True, include_head=True)
    out, _ = quantize_file(src, config, tmp_path / "q.onnx", request)
    targets = plan_quantization(ir.load(src), config).targets
    stats = calibrate(src, CalibrationRequest(data={"x": calibration_data()}, gram=True), targets)
    graph = ir.load(out).graph
    for t in targets:
        w = onnx.numpy_helper.to_array(next(i for i in mlp().graph.initializer if i.name == t.name)).T
        blocks = w.reshape(w.shape[0], -1, BLOCK)
        scales = np.concatenate([int4_scales(blocks[:, b]) for b in range(blocks.shape[1])], axis=1)
        assert (scales > 0).all()  # no all-zero block: the scales are round to nearest's
        codes = np.clip(np.rint(w / np.repeat(scales, BLOCK, axis=1)), -8, 7).astype(np.int8)
        expected = refit_scales(w, codes, scales, stats.gram[t.name], GRID)
        value = graph.initializers[t.name]
        written_codes = value.const_value.numpy().astype(np.int8).T  # type: ignore[union-attr]
        written_scales = next(u.node for u in value.uses()).inputs[1].const_value.numpy().T  # type: ignore[union-attr]
        np.testing.assert_array_equal(written_codes, codes)
        np.testing.assert_array_equal(written_scales, expected)
        assert not np.array_equal(expected, scales)  # the refit moved some scale
