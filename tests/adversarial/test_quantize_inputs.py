"""graphprune quantize on hostile inputs: one line, exit 2, nothing written; the input never modified."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from graphprune.cli import app
from tests.adversarial.builders import mlp, refused, snapshot
from tests.onnx_builders import init, make_model, tensor

runner = CliRunner()


def quantize(tmp_path: Path, model: onnx.ModelProto, *args: str):  # type: ignore[no-untyped-def]
    src = tmp_path / "in.onnx"
    onnx.save(model, src)
    before = snapshot(tmp_path)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if any(not d.HasField("dim_value") for d in dims):  # synthetic calibration needs a shape
        args = (*args, "--shape", "x=2x16")
    result = runner.invoke(app, ["quantize", str(src), "-o", str(tmp_path / "out.onnx"), *args])
    return result, before


def tied_embedding() -> onnx.ModelProto:
    """The embedding table E [V, D] gathered by ids and multiplied as a [K=V, N=D] weight: tied."""
    rng = np.random.default_rng(5100)  # this function's own data, whatever ran before
    e = rng.standard_normal((8, 16)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["emb"]),
        helper.make_node("MatMul", ["x", "E"], ["y"]),
        helper.make_node("Add", ["y", "emb"], ["z"]),
    ]
    return make_model(
        nodes,
        [tensor("ids", TensorProto.INT64, [4]), tensor("x", shape=[4, 8])],
        [tensor("z", shape=[4, 16])],
        [init(e, "E")],
    )


def integer_weight() -> onnx.ModelProto:
    rng = np.random.default_rng(5101)  # this function's own data, whatever ran before
    w = rng.integers(-3, 3, (16, 4)).astype(np.int32)
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    return make_model(
        [node], [tensor("x", TensorProto.INT32, [2, 16])], [tensor("y", TensorProto.INT32, [2, 4])], [init(w, "w")]
    )


def weight_in_body() -> onnx.ModelProto:
    """The only weight is multiplied inside an If branch."""
    rng = np.random.default_rng(5102)  # this function's own data, whatever ran before
    w = rng.standard_normal((16, 4)).astype(np.float32)
    branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["yb"])], "then", [], [tensor("yb", shape=[2, 4])]
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["zeros"], ["ye"])], "else", [], [tensor("ye", shape=[2, 4])]
    )
    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other)
    return make_model(
        [node],
        [tensor("cond", TensorProto.BOOL, []), tensor("x", shape=[2, 16])],
        [tensor("y", shape=[2, 4])],
        [init(w, "w"), init(np.zeros((2, 4), np.float32), "zeros")],
    )


def old_opset() -> onnx.ModelProto:
    """Opset 12 with Softmax, which opset 13 redefined: raising it to 19 for fp8 is not exact."""
    rng = np.random.default_rng(5103)  # this function's own data, whatever ran before
    w = rng.standard_normal((16, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("Softmax", ["a"], ["y"])]
    return make_model(nodes, [tensor("x", shape=[2, 16])], [tensor("y", shape=[2, 4])], [init(w, "w")], opset=12)


@pytest.mark.parametrize(
    ("model", "words"),
    [
        (tied_embedding, ("nothing to quantize", "Gather")),
        (integer_weight, ("nothing to quantize", "integer weight")),
        (weight_in_body, ("nothing to quantize", "subgraph")),
    ],
    ids=["gather-shared", "integer", "in-body"],
)
def test_unquantizable_weights_are_refused(tmp_path: Path, model, words: tuple[str, ...]) -> None:  # type: ignore[no-untyped-def]
    result, before = quantize(tmp_path, model(), "--precision", "int8")
    refused(result, *words)
    assert snapshot(tmp_path) == before


def test_already_quantized_model_is_refused_and_partly_quantized_one_says_which(tmp_path: Path) -> None:
    first, _ = quantize(tmp_path, mlp(), "--include-head")
    assert first.exit_code == 0, first.output
    done = onnx.load(tmp_path / "out.onnx")
    (tmp_path / "again").mkdir()
    result, before = quantize(tmp_path / "again", done, "--include-head")
    refused(result, "nothing to quantize", "already quantized")
    assert snapshot(tmp_path / "again") == before
    # the head left float the first time is quantized on its own the second time, and the rest is named
    (tmp_path / "partial").mkdir()
    first, _ = quantize(tmp_path / "partial", mlp())
    partial = onnx.load(tmp_path / "partial" / "out.onnx")
    (tmp_path / "rest").mkdir()
    second, _ = quantize(tmp_path / "rest", partial, "--include-head", "--json")
    assert second.exit_code == 0, second.output
    assert "already quantized and stay as they are" in second.output
    assert '"head"' in second.output


def test_fp8_on_an_opset_that_cannot_be_raised_exactly(tmp_path: Path) -> None:
    result, before = quantize(tmp_path, old_opset(), "--precision", "fp8", "--include-head")
    refused(result, "opset 19", "Softmax")
    assert snapshot(tmp_path) == before


def test_fp8_raises_an_opset_when_no_operator_changed(tmp_path: Path) -> None:
    result, _ = quantize(tmp_path, mlp(), "--precision", "fp8")
    assert result.exit_code == 0, result.output
    model = onnx.load(tmp_path / "out.onnx")
    assert [o.version for o in model.opset_import if o.domain == ""] == [19]
    assert "opset raised from 17 to 19" in result.output


def test_no_calibration_data_warns_as_apply_does(tmp_path: Path) -> None:
    result, _ = quantize(tmp_path, mlp(), "--precision", "int8")
    assert result.exit_code == 0, result.output
    assert "no calibration data: synthesising random inputs" in result.output
    assert (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize(
    ("args", "word"),
    [
        (["--precision", "int3"], "precision"),
        (["--precision", "int4", "--block-size", "48"], "block size"),
        (["--smooth", "1.5"], "smoothing"),
        (["--precision", "fp8", "--dynamic"], "dynamic"),
        (["--method", "obq"], "method"),
        (["--target", "tflite"], "target"),
    ],
)
def test_bad_options(tmp_path: Path, args: list[str], word: str) -> None:
    result, before = quantize(tmp_path, mlp(), *args)
    refused(result, word)
    assert snapshot(tmp_path) == before


def test_corrupted_gram_file(tmp_path: Path) -> None:
    (tmp_path / "stats.npz").write_bytes(b"PK\x03\x04 not really a zip")
    result, before = quantize(tmp_path, mlp(), "--method", "gptq", "--stats", str(tmp_path / "stats.npz"))
    refused(result, "stats.npz")
    assert snapshot(tmp_path) == before
