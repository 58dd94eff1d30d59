"""``graphprune shrink`` from the command line: outputs other commands accept, one-line errors, a real model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper
from typer.testing import CliRunner

from graphprune.cli import app
from tests.conftest import MiniLM
from tests.onnx_builders import bert_mlp, draw, init, make_model, residual_stack, run, tensor

runner = CliRunner()


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def _error_line(result) -> str:  # type: ignore[no-untyped-def]
    text = (result.stderr if hasattr(result, "stderr") else result.output).strip()
    return text


@pytest.fixture
def bert(tmp_path: Path) -> tuple[Path, object]:
    net = bert_mlp(d=8, hidden=16)
    return _save(net.model, tmp_path / "bert.onnx"), net


def test_shrink_writes_a_smaller_model_and_report_that_check_eval_and_apply_accept(bert, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, _ = bert
    before = model.read_bytes()
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=draw(np.random.default_rng(40), 32, 8, scale=1.0))
    out = tmp_path / "small.onnx"
    result = runner.invoke(
        app, ["shrink", str(model), "--ratio", "0.25", "--method", "flap", "--calib", str(calib), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert model.read_bytes() == before  # the input is never modified
    table_rows = [line for line in result.stdout.splitlines() if "16 → 12" in line]
    assert len(table_rows) == 1 and "mlp" in table_rows[0]  # the group's row: kind and units before → after
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    report = json.loads(out.with_name("small.report.json").read_text())
    (group,) = report["groups"]
    assert group["units_before"] == 16 and group["units_after"] == 12 and len(group["removed"]) == 4
    assert report["parameters_after"] == report["parameters_before"] - 4 * (8 + 1 + 8)
    small = onnx.load(str(out))
    assert [tuple(t.dims) for t in small.graph.initializer if t.name == "w1"] == [(8, 12)]
    # apply --nm 2:4 on the survivors, then check passes on the result
    pruned = tmp_path / "small.24.onnx"
    applied = runner.invoke(app, ["apply", str(out), "--nm", "2:4", "--include-head", "-o", str(pruned)])
    assert applied.exit_code == 0, applied.output
    checked = runner.invoke(app, ["check", str(pruned), "--nm", "2:4", "--include-head", "--no-eligibility"])
    assert checked.exit_code == 0, checked.output
    evaluated = runner.invoke(app, ["eval", str(model), str(out), "--calib", str(calib), "--json"])
    assert evaluated.exit_code == 0, evaluated.output


@pytest.mark.parametrize(("with_data", "expected"), [(True, "flap"), (False, "l2")])
def test_the_default_score_is_flap_with_data_and_l2_without(
    bert, tmp_path: Path, with_data: bool, expected: str
) -> None:  # type: ignore[no-untyped-def]
    """Data given without --method is used (flap), not ignored; the result equals the explicit method's."""
    model, _ = bert
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=draw(np.random.default_rng(41), 32, 8, scale=1.0))
    data = ["--calib", str(calib)] if with_data else []

    def removed(name: str, *method: str) -> tuple[str, list]:
        out = tmp_path / f"{name}.onnx"
        result = runner.invoke(app, ["shrink", str(model), "--ratio", "0.5", *method, *data, "-o", str(out)])
        assert result.exit_code == 0, result.output
        report = json.loads(out.with_name(f"{name}.report.json").read_text())
        return report["config"]["method"], [g["removed"] for g in report["groups"]]

    default = removed("default")
    assert default[0] == expected
    assert default == removed("explicit", "--method", expected)


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["--ratio", "1.5"], "invalid --ratio 1.5"),
        (["--ratio", "0"], "invalid --ratio 0"),
        (["--ratio", "-0.25"], "invalid --ratio -0.25"),
        (["--ratio", "1"], "invalid --ratio 1"),
        ([], "nothing to remove"),
        (["--ratio", "0.2", "--steps", "0"], "invalid --steps 0"),
        (["--ratio", "0.2", "--round-to", "0"], "invalid --round-to 0"),
        (["--blocks", "-1"], "invalid --blocks -1"),
        (["--ratio", "0.2", "--units", "mlp,bogus"], "invalid --units"),
        (["--ratio", "0.2", "--method", "wanda"], "need calibration data"),
        (["--ratio", "0.2", "--ratio-for", "oops"], "invalid --ratio-for"),
        (["--ratio", "0.2", "--ratio-for", "mlp*=1.0"], "invalid --ratio-for"),
        (
            ["--ratio", "0.2", "--method", "obs", "--allocate-by", "l2"],
            "--allocate-by l2 with a calibrated --method",
        ),
        (["--ratio", "0.2", "--allocate", "everywhere"], "choose from uniform, global, error"),
        (["--ratio", "0.2", "--target", "dense"], "refits on the shrunk prefix: it needs --sequential"),
        (["--ratio", "0.2", "--target", "teacher"], "choose from pruned, dense"),
        (["--ratio", "0.2", "--sequential", "--target", "dense", "--target-blend", "2"], "invalid --target-blend"),
        (["--ratio", "0.2", "--sequential", "--refit-scope", "all"], "it needs --target dense"),
        (["--ratio", "0.2", "--sequential", "--target", "dense", "--refit-scope", "some"], "invalid refit scope"),
    ],
)
def test_bad_options_are_one_line_errors(bert, tmp_path: Path, options: list[str], needle: str) -> None:  # type: ignore[no-untyped-def]
    model, _ = bert
    before = Path(model).read_bytes()
    out = tmp_path / "out.onnx"
    result = runner.invoke(app, ["shrink", str(model), *options, "-o", str(out)])
    assert result.exit_code == 2
    assert needle in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists() and Path(model).read_bytes() == before


def test_too_many_blocks_is_refused(tmp_path: Path) -> None:
    model, _, _ = residual_stack()
    path = _save(model, tmp_path / "res.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=draw(np.random.default_rng(42), 8, 8, scale=1.0))
    before = path.read_bytes()
    result = runner.invoke(
        app, ["shrink", str(path), "--blocks", "3", "--calib", str(calib), "-o", str(tmp_path / "o.onnx")]
    )
    assert result.exit_code == 2 and "has 3 residual blocks; at most 2 can go" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "o.onnx").exists() and path.read_bytes() == before


def test_a_model_without_structured_units_is_refused(tmp_path: Path) -> None:
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [tensor("x", shape=[2, 4])],
        [tensor("y", shape=[2, 3])],
        [init(draw(np.random.default_rng(43), 4, 3), "w")],
    )
    result = runner.invoke(app, ["shrink", str(_save(model, tmp_path / "m.onnx")), "--ratio", "0.5"])
    assert result.exit_code == 2 and "no structured unit" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_unit_that_would_lose_all_its_channels_is_refused_by_name(tmp_path: Path) -> None:
    net = bert_mlp(d=4, hidden=2)
    path = _save(net.model, tmp_path / "tiny.onnx")
    before = path.read_bytes()
    result = runner.invoke(app, ["shrink", str(path), "--ratio", "0.8", "-o", str(tmp_path / "o.onnx")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "would remove all of them" in result.output and "mlp into output_dense" in result.output
    assert not (tmp_path / "o.onnx").exists() and path.read_bytes() == before


@pytest.mark.slow
def test_minilm_heads_and_mlp_shrunk_by_a_quarter_stay_close(minilm: MiniLM, tmp_path: Path) -> None:
    calib = tmp_path / "calib.npz"
    np.savez(calib, **minilm.calibration_feeds)
    out = tmp_path / "minilm.small.onnx"
    result = runner.invoke(
        app,
        [
            "shrink",
            str(minilm.model),
            "--ratio",
            "0.25",
            "--method",
            "flap",
            "--calib",
            str(calib),
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_name("minilm.small.report.json").read_text())
    # the default global allocation: each kind loses a quarter in all, spread unevenly over the layers
    left = {
        kind: sum(g["units_after"] for g in report["groups"] if g["kind"] == kind) for kind in ("heads", "mlp")
    }
    assert left == {"heads": 27, "mlp": 3 * 1152}
    assert all(g["ratio"] <= 0.8 and g["refitted"] == (1 if g["removed"] else 0) for g in report["groups"])

    def embed(path: Path) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (e,) = session.run([minilm.embedding_output], minilm.heldout_feeds)
        return e / np.linalg.norm(e, axis=-1, keepdims=True)

    dense, small = embed(minilm.model), embed(out)
    cosine = (dense * small).sum(axis=-1)
    # every shrunk embedding stays nearest its own paragraph's dense embedding
    assert (np.argmax(small @ dense.T, axis=1) == np.arange(len(dense))).mean() > 0.9
    assert cosine.mean() > 0.8
    assert run  # the ONNX Runtime helper the tiny-model tests share


def test_sequential_dense_target_options_reach_the_refit(tmp_path: Path) -> None:
    model, _, _ = residual_stack()
    path = _save(model, tmp_path / "res.onnx")
    x = draw(np.random.default_rng(44), 64, 8, scale=1.0)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=x)
    common = ["shrink", str(path), "--ratio", "0.25", "--units", "mlp", "--allocate", "uniform", "--sequential"]
    common += ["--calib", str(calib), "--refit-damp", "0"]
    outputs = {}
    for name, extra in {
        "pruned": [],
        "blend0": ["--target", "dense", "--target-blend", "0"],
        "dense": ["--target", "dense"],
        "blend0_all": ["--target", "dense", "--target-blend", "0", "--refit-scope", "all"],
        "all": ["--target", "dense", "--refit-scope", "all"],
    }.items():
        out = tmp_path / f"{name}.onnx"
        result = runner.invoke(app, [*common, *extra, "-o", str(out)])
        assert result.exit_code == 0, result.output
        outputs[name] = run(onnx.load(str(out)), {"x": x})[0]
    dense = run(model, {"x": x})[0]
    # a blend of 0 aims at the shrunk prefix's own outputs: the plain sequential refit
    np.testing.assert_allclose(outputs["blend0"], outputs["pruned"], rtol=1e-4, atol=1e-4)
    # ... also when every layer is refitted (each one's own output as its target: nothing changes)
    np.testing.assert_allclose(outputs["blend0_all"], outputs["pruned"], rtol=1e-4, atol=1e-4)
    assert not np.allclose(outputs["all"], outputs["dense"], atol=1e-4)  # the first layers refitted too
    # the dense target lands closer to the dense model's outputs on its calibration data
    error = {k: float(np.mean((v - dense) ** 2)) for k, v in outputs.items()}
    assert error["dense"] < error["pruned"]
