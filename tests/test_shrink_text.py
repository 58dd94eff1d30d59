"""Text calibration of a BERT encoder: ``token_type_ids`` (segment 0 for one text) filled in each command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper
from tokenizers import Tokenizer, models, pre_tokenizers
from typer.testing import CliRunner

from graphprune.algorithms.structured import StructuredMethod
from graphprune.calibration.request import CalibrationRequest
from graphprune.calibration.signature import model_inputs
from graphprune.calibration.text import TextSource
from graphprune.cli.app import app
from graphprune.pipeline.shrink import ShrinkConfig, shrink_model
from tests.onnx_builders import init, make_model, run, tensor

VOCAB, D, HIDDEN, SEQ = 30, 8, 12, 10
WORDS = [f"w{i}" for i in range(VOCAB - 1)]


def encoder() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Word + segment embeddings (segment 1 far from segment 0, so a wrong fill shows), masked, then an MLP."""
    rng = np.random.default_rng(5700)  # this function's own data, whatever ran before
    w = {
        "words": rng.standard_normal((VOCAB, D)).astype(np.float32),
        "segments": np.stack([np.zeros(D), np.full(D, 5.0)]).astype(np.float32),
        "w1": (rng.standard_normal((D, HIDDEN)) * 0.5).astype(np.float32),
        "b1": (rng.standard_normal(HIDDEN) * 0.5).astype(np.float32),
        "w2": (rng.standard_normal((HIDDEN, D)) * 0.5).astype(np.float32),
        "b2": (rng.standard_normal(D) * 0.5).astype(np.float32),
        "last": np.array([-1], np.int64),
    }
    nodes = [
        helper.make_node("Gather", ["words", "input_ids"], ["e"]),
        helper.make_node("Gather", ["segments", "token_type_ids"], ["s"]),
        helper.make_node("Add", ["e", "s"], ["es"]),
        helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mf", "last"], ["m3"]),
        helper.make_node("Mul", ["es", "m3"], ["x"]),
        helper.make_node("MatMul", ["x", "w1"], ["a"]),
        helper.make_node("Add", ["a", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["o"]),
        helper.make_node("Add", ["o", "b2"], ["y"]),
    ]
    ints = [tensor(n, TensorProto.INT64, ["b", "s"]) for n in ("input_ids", "attention_mask", "token_type_ids")]
    model = make_model(nodes, ints, [tensor("y", shape=["b", "s", D])], [init(v, k) for k, v in w.items()])
    return model, w


def corpus(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(5701)  # this function's own data, whatever ran before
    tok = Tokenizer(
        models.WordLevel({w: i for i, w in enumerate(WORDS)} | {"[UNK]": VOCAB - 1}, unk_token="[UNK]")
    )
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "corpus.txt").write_text(" ".join(rng.choice(WORDS, 400)))
    return tmp_path / "corpus.txt", tmp_path / "tokenizer.json"


def test_text_windows_carry_segment_zero_and_shrink_sees_it(tmp_path: Path) -> None:
    text, tokenizer = corpus(tmp_path)
    model, w = encoder()
    source = TextSource(text, tokenizer, model_inputs(model), seqlen=SEQ, nsamples=6, seed=0, batch_size=3)
    feeds = [f for _, f in source]
    assert all(
        (f["token_type_ids"] == 0).all() and f["token_type_ids"].shape == f["input_ids"].shape for f in feeds
    )
    request = CalibrationRequest(str(text), tokenizer=str(tokenizer), seqlen=SEQ, nsamples=6, batch_size=3)
    m = ir.from_proto(model)
    config = ShrinkConfig(ratio=0.25, method=StructuredMethod.FLAP, refit=False, allocate="uniform")
    (record,) = shrink_model(m, config, request).groups
    # numpy: FLAP's fold is the removed neurons' mean contribution on the windows, segment embedding 0 added
    ids = np.concatenate([f["input_ids"] for f in feeds]).reshape(-1)
    h = np.maximum((w["words"][ids] + w["segments"][0]) @ w["w1"] + w["b1"], 0.0).astype(np.float64)
    contribution = (h[:, record.removed] @ w["w2"][record.removed]).mean(axis=0)
    b2 = m.graph.initializers["b2"].const_value.numpy()  # type: ignore[union-attr]
    np.testing.assert_allclose(b2 - w["b2"], contribution, rtol=1e-4, atol=1e-5)


def test_shrink_and_eval_commands_fill_token_type_ids_from_text(tmp_path: Path) -> None:
    text, tokenizer = corpus(tmp_path)
    model, _ = encoder()
    dense = tmp_path / "enc.onnx"
    onnx.save(model, str(dense))
    small = tmp_path / "small.onnx"
    common = ["--tokenizer", str(tokenizer), "--seqlen", str(SEQ)]
    result = CliRunner().invoke(
        app, ["shrink", str(dense), "--ratio", "0.25", "--calib", str(text), *common, "-o", str(small)]
    )
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(
        app, ["eval", str(dense), str(small), "--calib", str(text), *common, "--windows", "4", "--json"]
    )
    assert result.exit_code == 0, result.output
    (output,) = json.loads(result.output)["outputs"]
    # the same four windows through both models with segment 0, compared in numpy
    source = TextSource(text, tokenizer, model_inputs(model), seqlen=SEQ, nsamples=4, seed=0, batch_size=4)
    ((_, feed),) = list(source)
    a = run(model, feed)[0].reshape(4, -1).astype(np.float64)
    b = run(onnx.load(str(small)), feed)[0].reshape(4, -1).astype(np.float64)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert output["samples"] == 4 and output["cosine"] < 1.0
    np.testing.assert_allclose(output["cosine"], cosine.mean(), rtol=1e-5)
