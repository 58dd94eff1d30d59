"""Clipped activation scales (``clip`` mse / percentile): the scale chosen in the graph equals numpy's choice.

The reference is numpy on the calibration data itself: every candidate threshold of the documented grid
(``2^(-k/4)`` of max|x|, k = 0..23), each activation fake-quantized with that candidate's scale as ONNX's
QuantizeLinear / DequantizeLinear compute it (round half to even, saturation), the summed squared error or the
count of |x| above the threshold, and the choice the module docstring promises. The model's written scale must be
that candidate's.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from typer.testing import CliRunner

from graphprune.calibration.request import CalibrationRequest
from graphprune.cli import app
from graphprune.quantize.config import QuantizeConfig
from graphprune.quantize.files import quantize_file
from tests.onnx_builders import init, make_model, tensor

D, H = 16, 24
FRACTIONS = 2.0 ** (-np.arange(24) / 4.0)


def mlp(seed: int) -> onnx.ModelProto:
    """y = (x * g) @ W1 -> relu -> @ W2: the first activation is computed from the input alone (smoothable)."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Mul", ["x", "g"], ["n"]),
        helper.make_node("MatMul", ["n", "W1"], ["a"], name="fc1"),
        helper.make_node("Relu", ["a"], ["h"]),
        helper.make_node("MatMul", ["h", "W2"], ["y"], name="fc2"),
    ]
    params = [
        init(rng.uniform(0.5, 2.0, D).astype(np.float32), "g"),
        init(rng.standard_normal((D, H)).astype(np.float32), "W1"),
        init(rng.standard_normal((H, D)).astype(np.float32), "W2"),
    ]
    return make_model(nodes, [tensor("x", shape=["b", D])], [tensor("y", shape=["b", D])], params)


def calibration(seed: int) -> np.ndarray:
    """Gaussian activations, many of them, and a few outliers 40x the rest: the case a clip is for (with few
    elements the rounding error saved by a narrower range is smaller than the clipped outliers' error)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4096, D)).astype(np.float32)
    x.flat[rng.choice(x.size, 3, replace=False)] *= 40.0
    return x


def fake(x: np.ndarray, low: float, high: float, kind: str) -> np.ndarray:
    """DequantizeLinear(QuantizeLinear(x)) with the grid of the range [low, high] (the package's conventions)."""
    x = x.astype(np.float32)
    if kind == "fp8":
        scale = np.float32(max(abs(low), abs(high)) / 448.0)
        return np.clip(x / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale
    if kind == "uint8":
        low, high = min(low, 0.0), max(high, 0.0)
        scale = np.float32((high - low) / 255.0)
        zero = np.clip(np.rint(-low / scale), 0, 255)
        return (np.clip(np.rint(x / scale) + zero, 0, 255) - zero) * scale
    scale = np.float32(max(abs(low), abs(high)) / 127.0)
    return np.clip(np.rint(x / scale), -128, 127) * scale


def reference_range(x: np.ndarray, method: str, kind: str, percentile: float = 99.0) -> tuple[float, float]:
    """numpy's chosen range for activation values ``x``."""
    low, high = float(x.min()), float(x.max())
    peak = max(abs(low), abs(high))
    ranges = [(max(low, -f * peak), min(high, f * peak)) for f in FRACTIONS]
    if method == "mse":
        errors = [float(np.sum((fake(x, lo, hi, kind).astype(np.float64) - x) ** 2)) for lo, hi in ranges]
        return ranges[int(np.argmin(errors))]
    counts = np.array([np.count_nonzero(np.abs(x) > np.float32(f * peak)) for f in FRACTIONS])
    return ranges[int(np.flatnonzero(counts <= (1 - percentile / 100) * x.size).max())]


def reference_scale(low: float, high: float, kind: str) -> float:
    if kind == "uint8":
        return (max(high, 0.0) - min(low, 0.0)) / 255.0
    return max(abs(low), abs(high)) / (448.0 if kind == "fp8" else 127.0)


def written_scales(model: onnx.ModelProto) -> dict[str, float]:
    """Per quantized activation the scale its QuantizeLinear reads."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.input[0]: float(inits[n.input[1]]) for n in model.graph.node if n.op_type == "QuantizeLinear"}


def quantize(tmp_path: Path, model: onnx.ModelProto, calib: np.ndarray, **options: object) -> onnx.ModelProto:
    src = tmp_path / "model.onnx"
    onnx.save(model, src)
    config = QuantizeConfig(include_head=True, **options)  # type: ignore[arg-type]
    out, _ = quantize_file(src, config, tmp_path / "q.onnx", CalibrationRequest(data={"x": calib}), force=True)
    return onnx.load(out)


CASES = [("int8", "tensorrt", "int8"), ("int8", "ort", "uint8"), ("fp8", "tensorrt", "fp8")]


@pytest.mark.parametrize(("precision", "target", "kind"), CASES)
@pytest.mark.parametrize("method", ["mse", "percentile"])
def test_clip_chosen_in_the_graph_equals_numpy(
    tmp_path: Path, precision: str, target: str, kind: str, method: str
) -> None:
    model, calib = mlp(7100), calibration(7101)
    q = quantize(tmp_path, model, calib, precision=precision, target=target, clip=method, percentile=99.0)
    plain = quantize(tmp_path, model, calib, precision=precision, target=target)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    n = calib * inits["g"]
    h = np.maximum(n @ inits["W1"], 0)
    got, minmax = written_scales(q), written_scales(plain)
    for name, values in (("n", n), ("h", h)):
        want = reference_scale(*reference_range(values, method, kind), kind)
        np.testing.assert_allclose(got[name], want, rtol=1e-6)
        assert got[name] <= minmax[name] * (1 + 1e-7)  # a clip never widens the min/max range
    if (method, kind) != ("mse", "fp8"):  # E4M3's error is relative: clipping its outliers only adds error here
        assert got["n"] < 0.95 * minmax["n"]  # the outliers were clipped: the test sees a real choice


def test_clip_with_smoothing_scores_the_smoothed_activation(tmp_path: Path) -> None:
    model, calib = mlp(7110), calibration(7111)
    q = quantize(tmp_path, model, calib, precision="int8", target="tensorrt", clip="mse", smooth=0.5)
    g = numpy_helper.to_array(next(i for i in q.graph.initializer if i.name == "g"))  # the norm with 1/s folded in
    original = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "g"))
    assert not np.allclose(g, original)  # smoothing moved it
    want = reference_scale(*reference_range(calib * g, "mse", "int8"), "int8")
    np.testing.assert_allclose(written_scales(q)["n"], want, rtol=1e-6)


def test_minmax_is_the_default_and_reports_fraction_one(tmp_path: Path) -> None:
    model, calib = mlp(7120), calibration(7121)
    src = tmp_path / "model.onnx"
    onnx.save(model, src)
    request = CalibrationRequest(data={"x": calib})
    _, plain = quantize_file(src, QuantizeConfig(include_head=True), tmp_path / "a.onnx", request)
    _, clipped = quantize_file(src, QuantizeConfig(include_head=True, clip="mse"), tmp_path / "b.onnx", request)
    assert all(a.clip == 1.0 for a in plain.result.activations)
    by_name = {a.name: a for a in clipped.result.activations}
    assert by_name["n"].clip < 1.0
    # the record keeps the calibrated range; the scale is the clipped one
    assert by_name["n"].high == max(a.high for a in plain.result.activations if a.name == "n")  # type: ignore[type-var]


@pytest.mark.parametrize(
    "extra",
    [
        ["--clip", "median"],
        ["--clip", "mse", "--dynamic"],
        ["--clip", "mse", "--precision", "int4"],
        ["--clip", "percentile", "--percentile", "30"],
    ],
)
def test_bad_clip_options_exit_2_and_write_nothing(tmp_path: Path, extra: list[str]) -> None:
    src = tmp_path / "model.onnx"
    onnx.save(mlp(7130), src)
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(app, ["quantize", str(src), "-o", str(out), *extra])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()


def test_cli_reports_how_many_ranges_were_clipped(tmp_path: Path) -> None:
    src, data, out = tmp_path / "model.onnx", tmp_path / "calib.npz", tmp_path / "q.onnx"
    onnx.save(mlp(7140), src)
    np.savez(data, x=calibration(7141))
    args = ["quantize", str(src), "--include-head", "--clip", "percentile", "--percentile", "99"]
    args += ["--calib", str(data)]
    result = CliRunner().invoke(app, [*args, "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "q.report.json").read_text())
    clipped = sum(a["clip"] < 1.0 for a in report["activations"])
    assert clipped >= 1
    assert f"{clipped} of {len(report['activations'])} activation ranges clipped" in result.output
