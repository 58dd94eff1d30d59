"""--max-memory on every path of `apply`: honoured, warned about, or refused in one line, never ignored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from graphprune.cli import app
from graphprune.graph.model_io import load_model
from tests.onnx_builders import init, initializer, make_model, reference_nm_mask, run, tensor

HIDDEN = 16  # weights: 16x32 and 32x16 float32, 2 kB each


def two_layer() -> onnx.ModelProto:
    rng = np.random.default_rng(141400)  # this function's own data, whatever ran before
    a = rng.standard_normal((HIDDEN, 2 * HIDDEN)).astype(np.float32)
    b = rng.standard_normal((2 * HIDDEN, HIDDEN)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "a"], ["u"]),
        helper.make_node("Relu", ["u"], ["r"]),
        helper.make_node("MatMul", ["r", "b"], ["y"]),
    ]
    return make_model(
        nodes, [tensor("x", TensorProto.FLOAT, ["n", HIDDEN])], [tensor("y")], [init(a, "a"), init(b, "b")]
    )


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path]:
    """The same model with inline weights and with every tensor in ``<name>.data``."""
    model = two_layer()
    inline = tmp_path / "inline.onnx"
    onnx.save_model(model, str(inline))
    external = tmp_path / "ext" / "model.onnx"
    external.parent.mkdir()
    onnx.save_model(model, str(external), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    return inline, external


@pytest.fixture
def calib(tmp_path: Path) -> Path:
    rng = np.random.default_rng(141401)  # this function's own data, whatever ran before
    path = tmp_path / "calib.npz"
    np.savez(path, x=rng.standard_normal((8, HIDDEN)).astype(np.float32))
    return path


def apply(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["apply", *map(str, args)])
    return result.exit_code, result.output.replace("\n", " ")


def one_line_error(code: int, output: str) -> None:
    assert code == 2 and "Traceback" not in output, output


def weights(path: Path) -> dict[str, np.ndarray]:
    model = load_model(path)
    return {name: initializer(model, name) for name in ("a", "b")}


def test_an_inline_model_over_the_budget_is_refused_before_any_work(tmp_path: Path, models, calib) -> None:
    inline, _ = models
    out = tmp_path / "out.onnx"
    code, output = apply(inline, "--calib", calib, "--max-memory", "1KB", "-o", out)
    one_line_error(code, output)
    assert "--max-memory 1 kB cannot hold inline.onnx" in output and "external data" in output
    assert not out.exists() and not out.with_name("out.report.json").exists()


def test_an_inline_model_within_the_budget_warns_and_prunes_as_without_it(tmp_path: Path, models, calib) -> None:
    inline, _ = models
    code, output = apply(inline, "--calib", calib, "--max-memory", "1GB", "-o", tmp_path / "budget.onnx")
    assert code == 0, output
    assert "--max-memory is not enforced for inline.onnx" in output
    code, plain = apply(inline, "--calib", calib, "-o", tmp_path / "plain.onnx")
    assert code == 0 and "max-memory" not in plain
    got, expected = weights(tmp_path / "budget.onnx"), weights(tmp_path / "plain.onnx")
    for name in got:
        np.testing.assert_array_equal(got[name], expected[name])


def test_magnitude_on_external_data_streams_within_the_budget(tmp_path: Path, models) -> None:
    rng = np.random.default_rng(141402)  # this function's own data, whatever ran before
    _, external = models
    out = tmp_path / "out.onnx"
    code, output = apply(external, "--nm", "2:4", "--max-memory", "1MB", "-o", out)
    assert code == 0 and "warning" not in output, output
    dense, got = weights(external), weights(out)
    a = dense["a"]  # 2:4 magnitude along K (axis 0 of a MatMul weight); b is the head, left dense
    np.testing.assert_array_equal(got["a"], a * reference_nm_mask(a, 0, 2, 4))
    np.testing.assert_array_equal(got["b"], dense["b"])
    x = {"x": rng.standard_normal((3, HIDDEN)).astype(np.float32)}
    assert run(onnx.load(str(out)), x)[0].shape == (3, HIDDEN)

    code, output = apply(external, "--nm", "2:4", "--max-memory", "1KB", "-o", tmp_path / "small.onnx")
    one_line_error(code, output)
    assert "largest weight (2 kB)" in output and not (tmp_path / "small.onnx").exists()


def test_saved_statistics_count_against_the_budget(tmp_path: Path, models, calib) -> None:
    _, external = models
    stats = tmp_path / "stats.npz"
    result = CliRunner().invoke(app, ["calibrate", str(external), "--calib", str(calib), "-o", str(stats)])
    assert result.exit_code == 0, result.output
    # 2.1 kB holds the largest weight (2,048 bytes) but not it and the statistics (Σx² of 16 + 32 channels)
    code, output = apply(external, "--stats", stats, "--max-memory", "2100", "-o", tmp_path / "small.onnx")
    one_line_error(code, output)
    assert "the statistics (" in output and "largest weight (2 kB)" in output
    code, output = apply(external, "--stats", stats, "--max-memory", "1MB", "-o", tmp_path / "ok.onnx")
    assert code == 0 and "warning" not in output, output


def test_magnitude_says_it_does_not_read_calibration_data(tmp_path: Path, models, calib) -> None:
    _, external = models
    args = ["--method", "magnitude", "--nm", "2:4"]
    code, output = apply(external, *args, "--calib", calib, "--sequential", "-o", tmp_path / "calib.onnx")
    assert code == 0 and "uses no activations" in output, output
    code, _ = apply(external, *args, "-o", tmp_path / "plain.onnx")
    assert code == 0
    got, expected = weights(tmp_path / "calib.onnx"), weights(tmp_path / "plain.onnx")
    for name in got:
        np.testing.assert_array_equal(got[name], expected[name])
