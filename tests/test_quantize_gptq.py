"""quantize's GPTQ options on models built in code: sequential GPTQ (block by block on the quantized prefix),
activation order's static groups and the clip search, as written in the file, against numpy references."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper
from typer.testing import CliRunner

from graphprune.algorithms.clip_search import searched_scales
from graphprune.algorithms.masks import nm_violations
from graphprune.algorithms.pattern import NMPattern
from graphprune.algorithms.quant_grid import QuantGrid, dequantize_codes, quantize_codes
from graphprune.calibration import calibrate
from graphprune.calibration.request import CalibrationRequest
from graphprune.calibration.stats import ActivationStats
from graphprune.cli import app
from graphprune.errors import GraphpruneError
from graphprune.graph.targets import Target
from graphprune.quantize.config import QuantizeConfig
from graphprune.quantize.files import quantize_file
from graphprune.quantize.select import plan_quantization
from graphprune.quantize.sequential import solve_sequentially
from tests.onnx_builders import init, make_model, reference_nm_mask, tensor

D, H, BLOCK = 32, 64, 32
GRID = QuantGrid(precision="int4", block_size=BLOCK)


def sparse(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A [K, N] MatMul weight pruned 2:4 along K."""
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return w * reference_nm_mask(w, 0, 2, 4)


W1, W2 = sparse((D, H), 11), sparse((H, D), 12)


def two_layers(tmp_path: Path) -> Path:
    """y = relu(x @ W1) @ W2, both 2:4 along K, saved to ``tmp_path``."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["a"], name="fc1"),
        helper.make_node("Relu", ["a"], ["h"]),
        helper.make_node("MatMul", ["h", "W2"], ["y"], name="fc2"),
    ]
    model = make_model(
        nodes, [tensor("x", shape=["b", D])], [tensor("y", shape=["b", D])], [init(W1, "W1"), init(W2, "W2")]
    )
    src = tmp_path / "model.onnx"
    onnx.save(model, src)
    return src


def calibration() -> np.ndarray:
    rng = np.random.default_rng(7)
    mix = rng.standard_normal((D, D)) * 0.5 + np.eye(D)
    return (rng.standard_normal((128, D)) @ mix).astype(np.float32)  # correlated inputs: GPTQ's case


def written(path: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Codes [K, N] and blocked scales [K / block, N] of an int4 weight in a written model."""
    g = ir.load(path).graph
    codes = g.initializers[name].const_value.numpy().astype(np.int8)  # type: ignore[union-attr]
    scale = next(u.node for u in g.initializers[name].uses()).inputs[1].const_value.numpy()  # type: ignore[union-attr]
    return codes, scale


def test_sequential_second_layer_gram_is_that_of_the_quantized_first_layer(tmp_path: Path) -> None:
    src = two_layers(tmp_path)
    x = calibration()
    model = ir.load(src)
    config = QuantizeConfig(precision="int4", block_size=BLOCK, method="gptq", sequential=True, include_head=True)
    targets = plan_quantization(model, config).targets
    batches = [{"x": x[:64]}, {"x": x[64:]}]
    seen: dict[str, np.ndarray] = {}

    def keep_grams(group: list[Target], stats: ActivationStats) -> None:
        seen.update({t.name: stats.gram[t.name] for t in group})

    solved, _ = solve_sequentially(model, targets, config, batches, ["CPUExecutionProvider"], keep_grams)
    np.testing.assert_allclose(seen["W1"], x.T.astype(np.float64) @ x, rtol=1e-4)
    w1_hat = dequantize_codes(*solved["W1"], GRID).T  # canonical (out, K) back to the MatMul's [K, N]
    h_quantized = np.maximum(x @ w1_hat, 0).astype(np.float64)
    h_dense = np.maximum(x @ W1, 0).astype(np.float64)
    np.testing.assert_allclose(seen["W2"], h_quantized.T @ h_quantized, rtol=1e-4, atol=1e-3)
    assert not np.allclose(seen["W2"], h_dense.T @ h_dense, rtol=1e-3)  # not the dense model's Gram
    np.testing.assert_array_equal(ir.load(src).graph.initializers["W1"].const_value.numpy(), W1)
    stored = model.graph.initializers  # the model holds its float weights again
    np.testing.assert_array_equal(stored["W1"].const_value.numpy(), W1)  # type: ignore[union-attr]
    np.testing.assert_array_equal(stored["W2"].const_value.numpy(), W2)  # type: ignore[union-attr]
    for name, w in (("W1", W1), ("W2", W2)):
        codes = solved[name][0]
        assert np.all(codes.T[w == 0] == 0) and nm_violations(codes.astype(np.float32), NMPattern(2, 4)).size == 0


def test_sequential_file_writes_the_solved_codes(tmp_path: Path) -> None:
    src = two_layers(tmp_path)
    request = CalibrationRequest(data={"x": calibration()}, batch_size=64)
    runs = {}
    for sequential in (False, True):
        config = QuantizeConfig(
            precision="int4", block_size=BLOCK, method="gptq", sequential=sequential, include_head=True
        )
        out, report = quantize_file(src, config, tmp_path / f"q{sequential}.onnx", request, force=True)
        runs[sequential] = {name: written(out, name) for name in ("W1", "W2")}
        assert {w.method for w in report.result.weights} == {"gptq"}
    # The first layer sees the same inputs either way; the second sees the quantized first layer's outputs.
    for a, b in zip(runs[True]["W1"], runs[False]["W1"], strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(runs[True]["W2"][0], runs[False]["W2"][0])
    assert np.all(runs[True]["W2"][0][W2 == 0] == 0)


@pytest.mark.parametrize("clip", ["none", "hessian"])
def test_act_order_static_groups_are_the_written_scales(tmp_path: Path, clip: str) -> None:
    # Activation order sweeps the columns by descending Gram diagonal, but the scales of each block of K are fixed
    # before the sweep from the original weights: the file holds exactly those.
    src = two_layers(tmp_path)
    request = CalibrationRequest(data={"x": calibration()}, batch_size=64)
    config = QuantizeConfig(
        precision="int4", block_size=BLOCK, method="gptq", act_order=True, weight_clip=clip, include_head=True
    )  # type: ignore[arg-type]
    out, _ = quantize_file(src, config, tmp_path / "q.onnx", request, force=True)
    targets = plan_quantization(ir.load(src), config).targets
    grams = calibrate(src, CalibrationRequest(data={"x": calibration()}, batch_size=64, gram=True), targets).gram
    for name, w in (("W1", W1), ("W2", W2)):
        codes, scale = written(out, name)
        expected = searched_scales(w.T, GRID, clip, grams[name])  # type: ignore[arg-type]
        np.testing.assert_array_equal(scale, expected.T)
        assert np.all(codes[w == 0] == 0)


def test_rtn_with_mse_clip_writes_the_searched_scales(tmp_path: Path) -> None:
    src = two_layers(tmp_path)
    config = QuantizeConfig(precision="int4", block_size=BLOCK, weight_clip="mse", include_head=True)
    out, report = quantize_file(src, config, tmp_path / "q.onnx", force=True)  # no calibration needed
    plain, _ = quantize_file(
        src, QuantizeConfig(precision="int4", block_size=BLOCK, include_head=True), force=True
    )
    for name, w in (("W1", W1), ("W2", W2)):
        codes, scale = written(out, name)
        expected = searched_scales(w.T, GRID, "mse")
        np.testing.assert_array_equal(scale, expected.T)
        np.testing.assert_array_equal(codes, quantize_codes(w.T, expected, GRID).T)
        assert not np.array_equal(scale, written(plain, name)[1])  # some group is clipped
    assert {w.method for w in report.result.weights} == {"rtn"}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"act_order": True}, "options of the gptq method"),
        ({"method": "gptq", "percdamp": 0.0}, "dampening"),
        ({"weight_clip": "minmax"}, "unknown weight clip"),
    ],
)
def test_bad_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(GraphpruneError, match=message):
        QuantizeConfig(precision="int4", **options).validate()  # type: ignore[arg-type]


def test_cli_sequential_without_calibration_is_refused(tmp_path: Path) -> None:
    src = two_layers(tmp_path)
    out = tmp_path / "q.onnx"
    args = ["quantize", str(src), "--precision", "int4", "--method", "gptq", "--sequential", "-o", str(out)]
    args += ["--block-size", "32", "--include-head"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "--sequential needs calibration data" in result.output and "Traceback" not in result.output
    assert not out.exists()
    good = CliRunner().invoke(app, [*args, "--calib", str(_calib_file(tmp_path)), "--act-order", "--json"])
    assert good.exit_code == 0, good.output
    config = json.loads(good.output)["config"]
    assert config["sequential"] and config["act_order"] and out.exists()


def _calib_file(tmp_path: Path) -> Path:
    path = tmp_path / "calib.npz"
    np.savez(path, x=calibration())
    return path
