"""Class 3, eval: decoder exports with a key/value cache are scored from empty caches, and every mismatch between
the two models or with the data is one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from graphprune.cli import app
from graphprune.evaluate.perplexity import perplexity
from tests.adversarial.builders import mlp, refused
from tests.onnx_builders import init, make_model, tensor

runner = CliRunner()
VOCAB, HEADS, HEAD_DIM, MAX_POS = 13, 2, 4, 64


def _tables() -> tuple[np.ndarray, np.ndarray]:
    """Drawn once at import from a generator of their own: every test reads the same tables, whatever ran first."""
    rng = np.random.default_rng(4)
    return rng.standard_normal((VOCAB, VOCAB)).astype(np.float32), rng.standard_normal((MAX_POS, VOCAB)).astype(
        np.float32
    )


TABLE, POSITION_BIAS = _tables()


def decoder(ids_type: int = TensorProto.INT64) -> onnx.ModelProto:
    """logits[b, t] = TABLE[ids[b, t]] + POSITION_BIAS[position_ids[b, t]] + Σ past_key; present = past ++ new.

    A one-layer decoder with a real cache: with an empty past the cache term is 0, so the perplexity is that of
    the bigram-plus-position table, which numpy computes independently.
    """
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "ids"], ["token_logits"], axis=0),
        helper.make_node("Gather", ["position_bias", "position_ids"], ["position_logits"], axis=0),
        helper.make_node("Add", ["token_logits", "position_logits"], ["local"]),
        helper.make_node("ReduceSum", ["past_key_values.0.key", "axes"], ["past_sum"], keepdims=1),
        helper.make_node("Squeeze", ["past_sum", "last"], ["past_term"]),
        helper.make_node("Add", ["local", "past_term"], ["logits"]),
        helper.make_node("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["ids_f", "unsq"], ["ids_4d"]),
        helper.make_node("Shape", ["past_key_values.0.key"], ["past_shape"]),
        helper.make_node("Shape", ["ids"], ["ids_shape"]),
        helper.make_node("Slice", ["past_shape", "zero", "two"], ["bh"]),
        helper.make_node("Slice", ["ids_shape", "one", "two"], ["seq"]),
        helper.make_node("Concat", ["bh", "seq", "hd"], ["new_shape"], axis=0),
        helper.make_node("Expand", ["ids_4d", "new_shape"], ["new_kv"]),
        helper.make_node("Concat", ["past_key_values.0.key", "new_kv"], ["present.0.key"], axis=2),
        helper.make_node("Concat", ["past_key_values.0.value", "new_kv"], ["present.0.value"], axis=2),
    ]
    cache = ["batch", HEADS, "past_sequence_length", HEAD_DIM]
    present = ["batch", HEADS, "total_sequence_length", HEAD_DIM]
    return make_model(
        nodes,
        [
            tensor("input_ids", ids_type, ["batch", "sequence_length"]),
            tensor("attention_mask", TensorProto.INT64, ["batch", "total_sequence_length"]),
            tensor("position_ids", TensorProto.INT64, ["batch", "sequence_length"]),
            tensor("past_key_values.0.key", TensorProto.FLOAT, cache),
            tensor("past_key_values.0.value", TensorProto.FLOAT, cache),
        ],
        [
            tensor("logits", TensorProto.FLOAT, ["batch", "sequence_length", VOCAB]),
            tensor("present.0.key", TensorProto.FLOAT, present),
            tensor("present.0.value", TensorProto.FLOAT, present),
        ],
        [
            init(TABLE, "table"),
            init(POSITION_BIAS, "position_bias"),
            init(np.array([1, 2, 3], np.int64), "axes"),
            init(np.array([3], np.int64), "last"),
            init(np.array([1, 3], np.int64), "unsq"),
            init(np.array([0], np.int64), "zero"),
            init(np.array([1], np.int64), "one"),
            init(np.array([2], np.int64), "two"),
            init(np.array([HEAD_DIM], np.int64), "hd"),
        ],
        opset=18,
    )


def expected_perplexity(windows: np.ndarray) -> float:
    nll = []
    for window in windows:
        for t in range(window.size - 1):
            row = TABLE[window[t]].astype(np.float64) + POSITION_BIAS[t]
            nll.append(np.log(np.exp(row - row.max()).sum()) + row.max() - row[window[t + 1]])
    return float(np.exp(np.mean(nll)))


@pytest.mark.parametrize("ids_type", [TensorProto.INT64, TensorProto.INT32])
def test_kv_cache_decoder_perplexity_from_empty_caches(tmp_path: Path, ids_type: int) -> None:
    rng = np.random.default_rng(400)  # this function's own data, whatever ran before
    path = tmp_path / "decoder.onnx"
    onnx.checker.check_model(decoder(ids_type))
    onnx.save_model(decoder(ids_type), str(path))
    windows = rng.integers(0, VOCAB, size=(3, 17))
    np.testing.assert_allclose(perplexity(path, windows), expected_perplexity(windows), rtol=1e-6)
    np.savez(tmp_path / "w.npz", input_ids=windows)
    result = runner.invoke(
        app, ["eval", str(path), str(path), "--token-windows", str(tmp_path / "w.npz"), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = __import__("json").loads(result.output[result.output.index("{") :])
    assert report["perplexity_dense"] == pytest.approx(expected_perplexity(windows), rel=1e-6)


def renamed_input(model: onnx.ModelProto) -> None:
    model.graph.input[0].name = "z"
    model.graph.node[0].input[0] = "z"


def extra_output(model: onnx.ModelProto) -> None:
    model.graph.output.append(tensor("a", shape=[None, 32]))


def renamed_output(model: onnx.ModelProto) -> None:
    model.graph.node[-1].output[0] = "y2"
    model.graph.output[0].name = "y2"


def output_rank(model: onnx.ModelProto) -> None:
    model.graph.node[-1].output[0] = "y_flat"
    model.graph.node.append(
        helper.make_node("Unsqueeze", ["y_flat", "ax"], ["y"]),
    )
    model.graph.initializer.append(init(np.array([0], np.int64), "ax"))
    model.graph.output[0].type.tensor_type.shape.dim.insert(0, onnx.TensorShapeProto.Dimension(dim_value=1))


MISMATCHES = {
    "input renamed": (renamed_input, ["inputs", "z"]),
    "extra output": (extra_output, ["outputs", "a"]),
    "output renamed": (renamed_output, ["outputs", "y2"]),
    "output rank": (output_rank, ["rank"]),
}


@pytest.mark.parametrize("case", ["input renamed", "extra output", "output renamed", "output rank"])
def test_models_that_cannot_be_compared(tmp_path: Path, case: str) -> None:
    dense = tmp_path / "dense.onnx"
    onnx.save_model(mlp(), str(dense))
    other = mlp()
    edit, words = MISMATCHES[case]
    edit(other)
    onnx.save_model(other, str(tmp_path / "other.onnx"))
    np.savez(tmp_path / "c.npz", x=np.ones((4, 16), np.float32))
    result = runner.invoke(
        app, ["eval", str(dense), str(tmp_path / "other.onnx"), "--calib", str(tmp_path / "c.npz")]
    )
    refused(result, *words)


def test_input_types_that_differ(tmp_path: Path) -> None:
    dense = mlp()
    dense.graph.input[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    dense.graph.node.insert(0, helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT))
    dense.graph.node[1].input[0] = "x32"
    onnx.save_model(dense, str(tmp_path / "dense.onnx"))
    onnx.save_model(mlp(), str(tmp_path / "pruned.onnx"))
    np.savez(tmp_path / "c.npz", x=np.ones((4, 16), np.float64))
    args = [
        "eval",
        str(tmp_path / "dense.onnx"),
        str(tmp_path / "pruned.onnx"),
        "--calib",
        str(tmp_path / "c.npz"),
    ]
    refused(runner.invoke(app, args), "tensor(double)", "tensor(float)")


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"x": np.ones((4, 16), np.float64)}, ["float64", "float32"]),
        ({"x": np.ones((4, 8), np.float32)}, ["fixes axis 1"]),
        ({"x": np.ones((4, 2, 16), np.float32)}, ["rank 3"]),
        ({"q": np.ones((4, 16), np.float32)}, ["'q'"]),
    ],
)
def test_calibration_data_that_does_not_fit(tmp_path: Path, data: dict, words: list[str]) -> None:
    onnx.save_model(mlp(), str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "c.npz", **data)
    args = ["eval", str(tmp_path / "m.onnx"), str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "c.npz")]
    refused(runner.invoke(app, args), *words)


@pytest.mark.parametrize(
    ("windows", "words"),
    [
        (np.ones((2, 5), np.float32), ["integer"]),
        (-np.ones((2, 5), np.int64), ["non-negative"]),
        (np.full((2, 5), VOCAB + 3), ["window 0"]),  # onnxruntime finds the bad id first
        (np.ones(5, np.int64), ["(n, L + 1)"]),
        (np.ones((2, 1), np.int64), ["(n, L + 1)"]),
        (np.ones((0, 5), np.int64), ["(n, L + 1)"]),
    ],
)
def test_bad_token_windows(tmp_path: Path, windows: np.ndarray, words: list[str]) -> None:
    onnx.save_model(decoder(), str(tmp_path / "d.onnx"))
    np.savez(tmp_path / "w.npz", input_ids=windows)
    args = ["eval", str(tmp_path / "d.onnx"), str(tmp_path / "d.onnx"), "--token-windows", str(tmp_path / "w.npz")]
    refused(runner.invoke(app, args), *words)


def test_token_windows_that_are_not_an_npz(tmp_path: Path) -> None:
    onnx.save_model(decoder(), str(tmp_path / "d.onnx"))
    np.save(tmp_path / "w.npy", np.ones((2, 5), np.int64))
    (tmp_path / "junk.npz").write_bytes(b"junk")
    np.savez(tmp_path / "other.npz", ids=np.ones((2, 5), np.int64))
    for name, words in (("w.npy", [".npz archive"]), ("junk.npz", [".npz archive"]), ("other.npz", ["input_ids"])):
        args = [
            "eval",
            str(tmp_path / "d.onnx"),
            str(tmp_path / "d.onnx"),
            "--token-windows",
            str(tmp_path / name),
        ]
        refused(runner.invoke(app, args), *words)


def test_a_broken_tokenizer_is_one_line(tmp_path: Path) -> None:
    onnx.save_model(decoder(), str(tmp_path / "d.onnx"))
    (tmp_path / "heldout.txt").write_text("some held-out text " * 50)
    (tmp_path / "tokenizer.json").write_text("{not json")
    args = ["eval", str(tmp_path / "d.onnx"), str(tmp_path / "d.onnx"), "--text", str(tmp_path / "heldout.txt")]
    refused(runner.invoke(app, [*args, "--tokenizer", str(tmp_path / "tokenizer.json")]), "cannot read tokenizer")
