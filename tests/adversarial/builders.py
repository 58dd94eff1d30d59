"""Small models and helpers shared by the adversarial tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from tests.onnx_builders import init, make_model, tensor


def mlp(seed: int = 0, width: int = 32) -> onnx.ModelProto:
    """x[?, 16] -> MatMul w1 -> Relu -> MatMul w2 -> MatMul head -> y: two prunable weights and a head."""
    rng = np.random.default_rng(seed)
    return make_model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["a"]),
            helper.make_node("Relu", ["a"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["b"]),
            helper.make_node("MatMul", ["b", "head"], ["y"]),
        ],
        [tensor("x", shape=[None, 16])],
        [tensor("y", shape=[None, 4])],
        [
            init(rng.standard_normal((16, width)).astype(np.float32), "w1"),
            init(rng.standard_normal((width, 16)).astype(np.float32), "w2"),
            init(rng.standard_normal((16, 4)).astype(np.float32), "head"),
        ],
    )


def save_external(model: onnx.ModelProto, path: Path, data_name: str) -> Path:
    """Save with every tensor in one external-data file ``data_name`` beside the model."""
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name,
        size_threshold=0,
    )  # fmt: skip
    return path.parent / data_name


def refused(result: Any, *words: str) -> str:
    """A CliRunner result that failed the way bad input must: exit 2, one error line last, no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    lines = result.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == lines[-1:], result.output  # progress or warnings may come before it, nothing after
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (hidden ones included) with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
