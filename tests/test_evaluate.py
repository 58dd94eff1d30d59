"""Perplexity against a bigram model built in code, whose perplexity numpy computes independently."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from graphprune.errors import GraphpruneError
from graphprune.evaluate.perplexity import nll_from_logits, perplexity
from tests.bigram import VOCAB, bigram_model, expected_perplexity


def save(model: onnx.ModelProto, tmp_path: Path) -> Path:
    path = tmp_path / "bigram.onnx"
    onnx.save(model, path)
    return path


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
