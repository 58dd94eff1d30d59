"""Issue 12 (6): two initializers of one name make an invalid model, refused with one line, nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper
from typer.testing import CliRunner

from graphprune.cli import app
from graphprune.errors import GraphpruneError
from graphprune.graph.model_io import load_model
from tests.onnx_builders import init, make_model, tensor


def duplicated(path: Path) -> Path:
    rng = np.random.default_rng(600)  # this function's own data, whatever ran before
    w = rng.standard_normal((8, 4)).astype(np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [tensor("x", shape=[2, 8])],
        [tensor("y")],
        [init(w, "w"), init(w * 2, "w")],
    )
    onnx.save_model(model, str(path))
    return path


def test_load_refuses_duplicate_initializer_names(tmp_path: Path) -> None:
    with pytest.raises(GraphpruneError, match="'w' is defined twice"):
        load_model(duplicated(tmp_path / "m.onnx"))


@pytest.mark.parametrize("command", [["apply", "--nm", "2:4", "--include-head"], ["check", "--nm", "2:4"]])
def test_commands_refuse_it_in_one_line_and_write_nothing(tmp_path: Path, command: list[str]) -> None:
    path = duplicated(tmp_path / "m.onnx")
    before = path.read_bytes()
    result = CliRunner().invoke(app, [command[0], str(path), *command[1:]])
    assert result.exit_code == 2
    assert "defined twice" in result.output and len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"] and path.read_bytes() == before
