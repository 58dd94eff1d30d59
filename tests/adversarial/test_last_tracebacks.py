"""The last inputs that ended in a traceback, each with its whole class: empty paths for every path option, every
statistics metadata field of the wrong type, input sizes that ask for terabytes, non-finite activations for every
method. Each run must exit 2 with exactly one line on stderr, no traceback and no file written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper
from tokenizers import Tokenizer, models, pre_tokenizers
from typer.testing import CliRunner

import graphprune
from graphprune.calibration.stats_checks import FIELDS
from graphprune.cli import app
from graphprune.errors import GraphpruneError
from tests.adversarial.builders import mlp, snapshot
from tests.onnx_builders import IR_VERSION


def one_line_refusal(tmp_path: Path, args: list[str], *words: str) -> str:
    """Run the CLI in ``tmp_path``: exit 2, one stderr line (the error), no traceback, nothing written."""
    before = snapshot(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for word in words:
        assert word in lines[0], lines[0]
    assert snapshot(tmp_path) == before
    return lines[0]


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """A model, calibration data, and saved statistics with Gram matrices, all in ``tmp_path``."""
    onnx.save_model(mlp(), str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32))
    args = ["calibrate", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "c.npz"), "--gram", "-q"]
    assert CliRunner().invoke(app, [*args, "-o", str(tmp_path / "s.npz")]).exit_code == 0
    return tmp_path


# --- empty paths: every path option, as `-o ""` and as `--output=` ---------------------------------------------

M, C = "{tmp}/m.onnx", "{tmp}/c.npz"
EMPTY_PATHS = {
    "apply -o": ["apply", M, "-o", "", "--force"],
    "apply --output=": ["apply", M, "--output=", "--force"],
    "apply MODEL": ["apply", "", "--force"],
    "apply --stats": ["apply", M, "--stats", "", "--method", "wanda"],
    "apply --calib": ["apply", M, "--calib", "", "--force"],
    "apply --tokenizer": ["apply", M, "--calib", C, "--tokenizer", ""],
    "calibrate -o": ["calibrate", M, "--calib", C, "-o", "", "--force"],
    "convert -o": ["convert", M, "-o", "", "--force"],
    "convert MODEL": ["convert", "", "--force"],
    "check MODEL": ["check", ""],
    "eval --calib": ["eval", M, M, "--calib", ""],
    "eval --text": ["eval", M, M, "--text", "", "--tokenizer", "{tmp}/t.json"],
    "eval --token-windows": ["eval", M, M, "--token-windows", ""],
    "shrink -o": ["shrink", M, "--ratio", "0.25", "-o", "", "--force"],
    "shrink MODEL": ["shrink", "", "--ratio", "0.25"],
    "build -o": ["build", M, "-o", "", "--force"],
    "build --timing-cache": ["build", M, "-o", "{tmp}/e.engine", "--timing-cache", ""],
    "bench MODEL": ["bench", ""],
}


@pytest.mark.parametrize("case", list(EMPTY_PATHS))
def test_an_empty_path_is_one_line(files: Path, case: str) -> None:
    one_line_refusal(files, EMPTY_PATHS[case], "empty value" if "-" in case.split()[-1] else "empty")


@pytest.mark.parametrize(
    "call",
    [
        lambda d: graphprune.prune_file("", graphprune.PruneConfig()),
        lambda d: graphprune.prune_file(d / "m.onnx", graphprune.PruneConfig(), output=""),
        lambda d: graphprune.convert_file(""),
        lambda d: graphprune.convert_file(d / "m.onnx", ""),
        lambda d: graphprune.build_engine(d / "m.onnx", ""),
    ],
)
def test_the_library_refuses_an_empty_path_too(files: Path, call) -> None:  # type: ignore[no-untyped-def]
    before = snapshot(files)
    with pytest.raises(GraphpruneError, match="names no"):
        try:
            call(files)
        except GraphpruneError as exc:
            if "TensorRT" in str(exc) and "installed" in str(exc):
                pytest.skip("no TensorRT backend to reach the output check")
            raise
    assert snapshot(files) == before


# --- statistics metadata: every field with a value of the wrong type ---------------------------------------------

WRONG = {str: 7, int: "1", list: "w1", dict: ["w1"]}


@pytest.mark.parametrize("field", [*FIELDS, "version true", "version 0", "warnings of numbers"])
def test_statistics_metadata_of_the_wrong_type_is_one_line(files: Path, field: str) -> None:
    with np.load(files / "s.npz") as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays["meta"][()]))
    if field in FIELDS:
        meta[field] = WRONG[FIELDS[field]]
    else:
        key, value = {"version true": ("version", True), "version 0": ("version", 0)}.get(
            field, ("warnings", [1, 2])
        )
        meta[key] = value
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(files / "edited.npz", **arrays)
    args = ["apply", M, "--stats", "{tmp}/edited.npz", "--method", "sparsegpt", "-o", "{tmp}/o.onnx"]
    line = one_line_refusal(files, args, "edited.npz")
    assert "statistics" in line


# --- sizes that ask for terabytes: bounded before anything is allocated -----------------------------------------

TEXT_MODEL = """
< ir_version: 8, opset_import: ["" : 17] >
lm (int64[B, S] input_ids) => (float[B, S, 4] y) {
    e = Gather(table, input_ids)
    y = MatMul(e, w)
}
"""


def text_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    model = onnx.parser.parse_model(TEXT_MODEL)
    model.ir_version = IR_VERSION
    rng = np.random.default_rng(0)
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(rng.standard_normal((20, 8)).astype(np.float32), "table"),
            numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w"),
        ]
    )
    onnx.save_model(model, str(tmp_path / "lm.onnx"))
    words = [f"w{i}" for i in range(19)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)} | {"[UNK]": 19}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "t.json"))
    (tmp_path / "text.txt").write_text(" ".join(words * 20))
    return tmp_path / "lm.onnx", tmp_path / "t.json", tmp_path / "text.txt"


@pytest.mark.parametrize(
    "args",
    [
        ["apply", M, "--method", "wanda", "--shape", "x=100000000000x16"],
        ["apply", M, "--method", "wanda", "--shape", "x=1" + "0" * 30 + "x16"],
        ["calibrate", M, "--shape", "x=1000000000x16", "-o", "{tmp}/s2.npz"],
        ["calibrate", M, "--gram", "--nsamples", "1", "--shape", "x=100000000000x16", "-o", "{tmp}/s2.npz"],
    ],
)
def test_a_synthetic_shape_of_terabytes_is_refused_before_allocating(files: Path, args: list[str]) -> None:
    one_line_refusal(files, args, "--shape asks for", "GiB")


def test_text_batches_of_terabytes_are_refused_before_allocating(tmp_path: Path) -> None:
    model, tokenizer, text = text_files(tmp_path)
    args = ["calibrate", str(model), "--calib", str(text), "--tokenizer", str(tokenizer), "--seqlen", "16"]
    args += ["--nsamples", "1000000000000", "--batch-size", "1000000000000", "-o", str(tmp_path / "s.npz")]
    one_line_refusal(tmp_path, args, "--batch-size", "GiB")


def test_many_text_windows_in_small_batches_are_drawn_lazily(tmp_path: Path) -> None:
    from graphprune.calibration.signature import model_inputs
    from graphprune.calibration.text import TextSource

    model, tokenizer, text = text_files(tmp_path)
    specs = model_inputs(onnx.load_model(str(model)))
    source = TextSource(text, tokenizer, specs, seqlen=16, nsamples=10**12, seed=0, batch_size=2)
    label, feed = next(iter(source))  # 10**12 windows are never listed up front
    assert label == "text windows 0:2" and feed["input_ids"].shape == (2, 16)


# --- non-finite activations: every method, every command that calibrates -----------------------------------------


@pytest.mark.parametrize("value", [np.inf, np.nan, 1e30])  # 1e30 is finite, its square is not in float32
@pytest.mark.parametrize(
    "args",
    [
        ["apply", M, "--method", "sparsegpt"],
        ["apply", M, "--method", "alps", "--sequential"],
        ["apply", M, "--method", "wanda"],
        ["calibrate", M, "--gram", "-o", "{tmp}/s2.npz"],
        ["calibrate", M, "-o", "{tmp}/s3.npz"],
        ["shrink", M, "--ratio", "0.25", "--method", "flap"],
    ],
)
def test_non_finite_activations_are_one_line_for_every_method(files: Path, value: float, args: list[str]) -> None:
    x = np.random.default_rng(1).standard_normal((8, 16)).astype(np.float32)
    x[2, 3] = value
    np.savez(files / "bad.npz", x=x)
    line = one_line_refusal(files, [*args, "--calib", "{tmp}/bad.npz"], "not finite")
    assert "w1" in line or "r" in line
