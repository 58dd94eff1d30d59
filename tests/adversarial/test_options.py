"""Class 3, options: every bad value is refused in one line before any long work (no model is even read)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from graphprune.cli import app
from tests.adversarial.builders import mlp, refused, snapshot

runner = CliRunner()

BAD_APPLY = {
    "--blocksize 0": (["--method", "sparsegpt", "--blocksize", "0"], "--blocksize"),
    "--blocksize -5": (["--method", "sparsegpt", "--blocksize", "-5"], "--blocksize"),
    "--percdamp -1": (["--method", "sparsegpt", "--percdamp", "-1"], "--percdamp"),
    "--percdamp nan": (["--method", "sparsegpt", "--percdamp", "nan"], "--percdamp"),
    "--percdamp inf": (["--method", "sparsegpt", "--percdamp", "inf"], "--percdamp"),
    "--gram-memory nan": (["--method", "sparsegpt", "--gram-memory", "nan"], "--gram-memory"),
    "--gram-memory 0": (["--method", "sparsegpt", "--gram-memory", "0"], "--gram-memory"),
    "--gram-memory -inf": (["--method", "sparsegpt", "--gram-memory", "-inf"], "--gram-memory"),
    "--nsamples -3": (["--nsamples", "-3"], "--nsamples"),
    "--nsamples 0": (["--nsamples", "0"], "--nsamples"),
    "--seqlen 0": (["--seqlen", "0"], "--seqlen"),
    "--batch-size 0": (["--batch-size", "0"], "--batch-size"),
    "--shape x=0x8": (["--shape", "x=0x16"], "at least 1"),
    "--shape x=4x0": (["--shape", "x=4x0"], "at least 1"),
    "--shape x=-1x16": (["--shape", "x=-1x16"], "--shape"),
    "--shape garbage": (["--shape", "x=ax16"], "--shape"),
    "--by-level alone": (["--by-level"], "--sequential"),
    "--sequential with --stats": (["--sequential", "--stats", "STATS"], "--calib"),
    "--stats and --calib": (["--stats", "STATS", "--calib", "c.npz"], "not both"),
    "--nm 0:4": (["--nm", "0:4"], "0 < N < M"),
    "--nm 4:4": (["--nm", "4:4"], "0 < N < M"),
    "--nm 2:x": (["--nm", "2:x"], "N:M"),
    "--sparsity 1": (["--sparsity", "1"], "--sparsity"),
    "--sparsity nan": (["--sparsity", "nan"], "--sparsity"),
    "--nm and --sparsity disagree": (["--nm", "2:4", "--sparsity", "0.3"], "means sparsity"),
}


@pytest.mark.parametrize("case", list(BAD_APPLY))
def test_bad_apply_options_fail_before_any_work(tmp_path: Path, case: str) -> None:
    # The calibration data does not exist and the model is a directory: a check that ran after loading or
    # calibrating would report those instead of the option.
    args, words = BAD_APPLY[case]
    args = [str(tmp_path / "s.npz") if a == "STATS" else a for a in args]
    calib = [] if "--stats" in args or "--calib" in args else ["--calib", str(tmp_path / "absent.npz")]
    result = runner.invoke(app, ["apply", str(tmp_path), *calib, *args, "-o", str(tmp_path / "o.onnx")])
    refused(result, words)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--nsamples", "-3"], "--nsamples"),
        (["--seqlen", "0"], "--seqlen"),
        (["--batch-size", "0"], "--batch-size"),
        (["--shape", "x=0x8"], "at least 1"),
    ],
)
def test_bad_calibrate_options_fail_before_any_work(tmp_path: Path, args: list[str], words: str) -> None:
    result = runner.invoke(app, ["calibrate", str(tmp_path), *args, "-o", str(tmp_path / "s.npz")])
    refused(result, words)
    assert list(tmp_path.iterdir()) == []


def test_impossible_shapes_are_refused_before_calibration(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    onnx.save_model(mlp(), str(model))
    before = snapshot(tmp_path)
    for shape, words in (("x=2x3", "fixes"), ("zz=2x3", "no such input"), ("x=2x16x1", "x")):
        refused(runner.invoke(app, ["apply", str(model), "--method", "wanda", "--shape", shape]), words)
    assert snapshot(tmp_path) == before


def test_a_singular_gram_matrix_is_one_line(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    onnx.save_model(mlp(), str(model))
    np.savez(tmp_path / "c.npz", x=np.ones((2, 16), np.float32))  # rank-1 activations, no dampening
    args = ["apply", str(model), "--calib", str(tmp_path / "c.npz"), "--method", "sparsegpt", "--percdamp", "0"]
    refused(runner.invoke(app, args), "sparsegpt cannot prune", "positive definite")
    assert not (tmp_path / "m.pruned.onnx").exists()


def test_a_valid_run_still_works_after_the_checks(tmp_path: Path) -> None:
    # the same options at their limits are accepted and give a 2:4 model
    model = tmp_path / "m.onnx"
    onnx.save_model(mlp(), str(model))
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32))
    args = ["--method", "sparsegpt", "--blocksize", "1", "--percdamp", "0", "--gram-memory", "0.001"]
    result = runner.invoke(
        app, ["apply", str(model), "--calib", str(tmp_path / "c.npz"), "--batch-size", "1", *args]
    )
    assert result.exit_code == 0, result.output
    pruned = onnx.load_model(str(tmp_path / "m.pruned.onnx"))
    w1 = onnx.numpy_helper.to_array(next(t for t in pruned.graph.initializer if t.name == "w1"))
    assert (np.count_nonzero(w1.reshape(4, 4, -1), axis=1) <= 2).all()  # 2:4 along K (axis 0 of a MatMul B)
