"""Perplexity against a bigram model built in code, whose perplexity numpy computes independently."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.errors import GraphpruneError
from graphprune.evaluate.perplexity import nll_from_logits, perplexity

VOCAB = 11


def bigram_model(table: np.ndarray, with_mask: bool, extra_input: bool = False) -> onnx.ModelProto:
    """logits[b, t] = table[input_ids[b, t]] (times attention_mask[b, t] when the model takes a mask)."""
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", table.shape[1]])
    inits = [numpy_helper.from_array(table.astype(np.float32), "table")]
    inputs = [ids]
    out = "logits"
    if with_mask:
        out = "raw"
    nodes = [helper.make_node("Gather", ["table", "input_ids"], [out], axis=0)]
    if with_mask:
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]))
        inits.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), "last"))
        nodes += [
            helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["mask_f", "last"], ["mask_3d"]),
            helper.make_node("Mul", ["raw", "mask_3d"], ["logits"]),
        ]
    if extra_input:
        inputs.append(helper.make_tensor_value_info("speaker_ids", TensorProto.INT64, ["batch", "seq"]))
    graph = helper.make_graph(nodes, "bigram", inputs, [logits], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def save(model: onnx.ModelProto, tmp_path: Path) -> Path:
    path = tmp_path / "bigram.onnx"
    onnx.save(model, path)
    return path


def expected_perplexity(table: np.ndarray, windows: np.ndarray) -> float:
    """By hand: log-softmax of every table row at once, then look up each (previous, next) pair."""
    table = table.astype(np.float32).astype(np.float64)
    log_probs = table - np.log(np.sum(np.exp(table), axis=1, keepdims=True))
    nll = [-log_probs[prev, nxt] for w in windows for prev, nxt in itertools.pairwise(w)]
    return float(np.exp(np.mean(nll)))


@pytest.fixture
def table() -> np.ndarray:
    return np.random.default_rng(0).normal(scale=2.0, size=(VOCAB, VOCAB))


@pytest.fixture
def windows() -> np.ndarray:
    return np.random.default_rng(1).integers(0, VOCAB, size=(5, 9), dtype=np.int64)


@pytest.mark.parametrize("with_mask", [True, False])
def test_perplexity_matches_bigram_by_hand(
    tmp_path: Path, table: np.ndarray, windows: np.ndarray, with_mask: bool
) -> None:
    path = save(bigram_model(table, with_mask), tmp_path)
    assert perplexity(path, windows) == pytest.approx(expected_perplexity(table, windows), rel=1e-6)


def test_uniform_model_has_perplexity_vocab_size(tmp_path: Path, windows: np.ndarray) -> None:
    path = save(bigram_model(np.zeros((VOCAB, VOCAB)), with_mask=True), tmp_path)
    assert perplexity(path, windows) == pytest.approx(VOCAB, rel=1e-9)


def test_accepts_session_and_reports_progress(tmp_path: Path, table: np.ndarray, windows: np.ndarray) -> None:
    session = ort.InferenceSession(
        str(save(bigram_model(table, True), tmp_path)), providers=["CPUExecutionProvider"]
    )
    calls: list[tuple[int, int]] = []
    ppl = perplexity(session, windows, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i + 1, len(windows)) for i in range(len(windows))]
    assert ppl == pytest.approx(expected_perplexity(table, windows), rel=1e-6)


def test_without_attention_a_model_needing_the_mask_is_an_error(
    tmp_path: Path, table: np.ndarray, windows: np.ndarray
) -> None:
    path = save(bigram_model(table, with_mask=True), tmp_path)
    with pytest.raises(GraphpruneError, match="attention_mask"):
        perplexity(path, windows, attention=False)


def test_unknown_extra_input_is_an_error(tmp_path: Path, table: np.ndarray, windows: np.ndarray) -> None:
    path = save(bigram_model(table, with_mask=True, extra_input=True), tmp_path)
    with pytest.raises(GraphpruneError, match="speaker_ids"):
        perplexity(path, windows)


def test_bad_windows_shape_is_an_error(tmp_path: Path, table: np.ndarray) -> None:
    path = save(bigram_model(table, with_mask=True), tmp_path)
    with pytest.raises(GraphpruneError):
        perplexity(path, np.zeros((3, 1), dtype=np.int64))


def test_missing_model_is_an_error(tmp_path: Path, windows: np.ndarray) -> None:
    with pytest.raises(GraphpruneError, match="not found"):
        perplexity(tmp_path / "nope.onnx", windows)


def test_nll_from_logits_matches_numpy() -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(scale=3.0, size=(150, 37)).astype(np.float32)  # crosses the internal row chunks
    targets = rng.integers(0, 37, size=150)
    wide = logits.astype(np.float64)
    expected = np.log(np.exp(wide).sum(axis=1)) - wide[np.arange(150), targets]
    got = nll_from_logits(logits, targets)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_nll_from_logits_is_stable_for_huge_logits() -> None:
    logits = np.array([[1000.0, 1000.0, -1000.0], [5000.0, 0.0, 0.0]], dtype=np.float32)
    got = nll_from_logits(logits, np.array([0, 1]))
    np.testing.assert_allclose(got, [np.log(2.0), 5000.0], rtol=1e-9)


def test_nll_from_logits_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        nll_from_logits(np.zeros((4, 3)), np.zeros(5, dtype=np.int64))
