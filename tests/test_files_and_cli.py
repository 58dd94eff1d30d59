"""Files (external data, IR version, atomic writes) and the command line, bad input included."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from typer.testing import CliRunner

from graphprune.cli import app
from graphprune.errors import GraphpruneError
from graphprune.graph.model_io import load_model, save_model
from tests.onnx_builders import layered_model, run

runner = CliRunner()


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save_model(layered_model(), str(path))
    return path


def test_apply_writes_model_and_report_and_keeps_the_input(model_path: Path) -> None:
    before = model_path.read_bytes()
    result = runner.invoke(app, ["apply", str(model_path), "--nm", "2:4"])
    assert result.exit_code == 0, result.output
    assert model_path.read_bytes() == before
    out = model_path.with_name("model.pruned.onnx")
    pruned = onnx.load_model(str(out))
    assert pruned.ir_version == 8
    assert [(o.domain, o.version) for o in pruned.opset_import] == [("", 17), ("com.example", 1)]
    assert {p.key: p.value for p in pruned.metadata_props} == {"author": "tests"}
    assert [(f.domain, f.name) for f in pruned.functions] == [("com.example", "Double")]
    report = json.loads(model_path.with_name("model.pruned.report.json").read_text())
    assert report["pruned"] == 2 and report["skipped"] == 1 and report["sparsity_achieved"] == 0.5
    by_name = {w["name"]: w for w in report["weights"]}
    assert by_name["w1"]["k_axis"] == 0 and by_name["w1"]["shape"] == [16, 32] and by_name["w1"]["sparsity"] == 0.5
    assert "head" in by_name["head"]["skipped"]
    assert "skipped head" in result.output

    assert runner.invoke(app, ["check", str(out), "--nm", "2:4"]).exit_code == 0
    assert runner.invoke(app, ["check", str(model_path), "--nm", "2:4"]).exit_code == 1
    gate = runner.invoke(app, ["check", str(out), "--nm", "1:4", "--json"])
    assert gate.exit_code == 1
    verdict = json.loads(gate.stdout)
    assert verdict["ok"] is False and {w["name"] for w in verdict["weights"]} == {"w1", "w2"}


def test_existing_output_needs_force(model_path: Path) -> None:
    out = model_path.with_name("out.onnx")
    out.write_text("keep me")
    result = runner.invoke(app, ["apply", str(model_path), "-o", str(out)])
    assert result.exit_code == 2 and "--force" in result.output
    assert out.read_text() == "keep me"
    assert runner.invoke(app, ["apply", str(model_path), "-o", str(out), "--force"]).exit_code == 0
    assert onnx.load_model(str(out)).graph.node


@pytest.mark.parametrize("nm", ["3:2", "0:4", "2:0", "4", "a:b", "2:2"])
def test_bad_nm_values_are_one_line_errors(model_path: Path, nm: str) -> None:
    result = runner.invoke(app, ["apply", str(model_path), "--nm", nm])
    assert result.exit_code == 2
    assert "error:" in result.output and "Traceback" not in result.output
    assert not model_path.with_name("model.pruned.onnx").exists()


@pytest.mark.parametrize("sparsity", ["1.0", "-0.1", "1.5"])
def test_bad_sparsity_is_refused(model_path: Path, sparsity: str) -> None:
    result = runner.invoke(app, ["apply", str(model_path), "--sparsity", sparsity])
    assert result.exit_code == 2 and "sparsity" in result.output
    assert not model_path.with_name("model.pruned.onnx").exists()


def bad_files(tmp_path: Path, model_path: Path) -> dict[str, Path]:
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 10)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(model_path.read_bytes()[: model_path.stat().st_size * 2 // 3])
    return {"missing": tmp_path / "missing.onnx", "text": text, "truncated": truncated, "directory": tmp_path}


@pytest.mark.parametrize("kind", ["missing", "text", "truncated", "directory"])
def test_unreadable_models_are_one_line_errors(tmp_path: Path, model_path: Path, kind: str) -> None:
    path = bad_files(tmp_path, model_path)[kind]
    before = sorted(p.name for p in tmp_path.iterdir())
    done = subprocess.run(
        [sys.executable, "-m", "graphprune", "apply", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_output_equal_to_input_is_refused(model_path: Path) -> None:
    before = model_path.read_bytes()
    result = runner.invoke(app, ["apply", str(model_path), "-o", str(model_path), "--force"])
    assert result.exit_code == 2 and "input" in result.output
    assert model_path.read_bytes() == before


def test_wanda_without_data_calibrates_on_synthetic_inputs(model_path: Path) -> None:
    result = runner.invoke(app, ["apply", str(model_path), "--method", "wanda"])
    assert result.exit_code == 2 and "--shape, e.g. x=1x16" in result.output  # a dynamic batch needs a shape
    result = runner.invoke(app, ["apply", str(model_path), "--method", "wanda", "--shape", "x=4x16"])
    assert result.exit_code == 0, result.output
    assert "synthes" in result.output  # warned: real data gives better masks
    report = json.loads(model_path.with_name("model.pruned.report.json").read_text())
    assert report["method"] == "wanda" and report["pruned"] == 2


def test_stats_and_calib_together_are_refused(model_path: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["apply", str(model_path), "--stats", "s.npz", "--calib", "c.npz"])
    assert result.exit_code == 2 and "not both" in result.output


def test_external_data_round_trip_keeps_values_and_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(301)  # this function's own data, whatever ran before
    model = layered_model()
    source = tmp_path / "big.onnx"
    on_disk = onnx.ModelProto()
    on_disk.CopyFrom(model)  # saving with external data moves the weights out of the proto it is given
    onnx.save_model(on_disk, str(source), save_as_external_data=True, location="big.onnx.data", size_threshold=0)
    loaded = load_model(source)
    target = tmp_path / "out" / "copy.onnx"
    save_model(loaded, target, external_data=True)
    assert (tmp_path / "out" / "copy.onnx.data").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["copy.onnx", "copy.onnx.data"]
    x = rng.standard_normal((3, 16)).astype(np.float32)
    np.testing.assert_array_equal(run(onnx.load_model(str(target)), {"x": x})[0], run(model, {"x": x})[0])


def test_apply_keeps_external_data_external(tmp_path: Path) -> None:
    source = tmp_path / "ext.onnx"
    model = layered_model()
    onnx.save_model(model, str(source), save_as_external_data=True, location="ext.data", size_threshold=0)
    assert runner.invoke(app, ["apply", str(source)]).exit_code == 0
    out = tmp_path / "ext.pruned.onnx"
    assert (tmp_path / "ext.pruned.onnx.data").stat().st_size > 0
    proto = onnx.load_model(str(out), load_external_data=False)
    external = {t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert external == {"w1", "w2"}  # tensors under 1 KiB (the 256-byte head) stay inline


def test_a_failed_save_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ir, "save", explode)
    with pytest.raises(OSError):
        save_model(ir.from_proto(layered_model()), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_every_command_documents_its_options_with_an_example() -> None:
    for command in ("apply", "check"):
        text = runner.invoke(app, [command, "--help"]).output
        assert "Example" in text and "--nm" in text


def test_check_reports_tensorrt_eligibility(model_path: Path) -> None:
    out = model_path.with_name("model.pruned.onnx")
    assert runner.invoke(app, ["apply", str(model_path)]).exit_code == 0
    verdict = json.loads(runner.invoke(app, ["check", str(out), "--json"]).stdout)
    records = {r["name"]: r for r in verdict["tensorrt_eligibility"]}
    assert set(records) == {"w1", "w2"}  # the same weights as the N:M check
    # an FP32 model with 16-32 channels: not eligible, and the report says why
    assert all(r["status"] == "ineligible" and r["precision"] == "fp32" for r in records.values())
    assert "tensorrt_eligibility" not in json.loads(
        runner.invoke(app, ["check", str(out), "--nm", "4:8", "--json"]).stdout
    )


def test_truncated_external_data_is_a_one_line_error(tmp_path: Path) -> None:
    source = tmp_path / "ext.onnx"
    model = layered_model()
    onnx.save_model(model, str(source), save_as_external_data=True, location="ext.data", size_threshold=0)
    data = tmp_path / "ext.data"
    data.write_bytes(data.read_bytes()[:-100])
    result = runner.invoke(app, ["apply", str(source)])
    assert result.exit_code == 2 and "truncated" in result.output
    assert not (tmp_path / "ext.pruned.onnx").exists()


def test_nothing_to_prune_is_an_error_and_writes_nothing(model_path: Path) -> None:
    result = runner.invoke(app, ["apply", str(model_path), "--include", "no-such-weight"])
    assert result.exit_code == 2 and "nothing to prune" in result.output and "--include" in result.output
    assert not model_path.with_name("model.pruned.onnx").exists()


def test_error_text_in_brackets_is_printed_as_is(model_path: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(302)  # this function's own data, whatever ran before
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((4, 16)).astype(np.float32))
    args = ["calibrate", str(model_path), "--calib", str(tmp_path / "calib.npz"), "-o", str(tmp_path / "s.npz")]
    result = runner.invoke(app, [*args, "--provider", "cuda"])
    # this suite runs with the CPU-only onnxruntime: the hint names the [gpu] extra, brackets included
    assert result.exit_code == 2 and "graphprune[gpu]" in result.output.replace("\n", "")


def test_external_data_outside_the_model_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    source = tmp_path / "models" / "m.onnx"
    onnx.save_model(layered_model(), str(source), save_as_external_data=True, location="w.bin", size_threshold=0)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 100_000)
    proto = onnx.load_model(str(source), load_external_data=False)
    for t in proto.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "../secret.bin"
    onnx.save_model(proto, str(source))
    with pytest.raises(GraphpruneError, match="outside the model's directory") as caught:
        load_model(source)
    assert "100000" not in str(caught.value)  # the size of the outside file is not disclosed
