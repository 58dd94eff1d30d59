"""A real pretrained model nobody here wrote, pruned to 2:4 end to end through the command line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from graphprune.cli import app
from tests.conftest import MiniLM

pytestmark = pytest.mark.slow
runner = CliRunner()


def embed(model: Path, minilm: MiniLM) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (out,) = session.run([minilm.embedding_output], minilm.heldout_feeds)
    return out / np.linalg.norm(out, axis=-1, keepdims=True)


def test_minilm_pruned_to_2_4_passes_check_and_stays_close(minilm: MiniLM, tmp_path: Path) -> None:
    out = tmp_path / "minilm.pruned.onnx"
    applied = runner.invoke(app, ["apply", str(minilm.model), "--nm", "2:4", "-o", str(out)])
    assert applied.exit_code == 0, applied.output
    assert "pruned" in applied.output and "18" in applied.output  # 18 MatMul weights, all pruned

    checked = runner.invoke(app, ["check", str(out), "--nm", "2:4"])
    assert checked.exit_code == 0 and "passes (18 weights checked)" in checked.output
    assert runner.invoke(app, ["check", str(minilm.model), "--nm", "2:4"]).exit_code == 1

    dense, pruned = embed(minilm.model, minilm), embed(out, minilm)
    cosine = (dense * pruned).sum(axis=-1)
    unrelated = (dense * np.roll(dense, 1, axis=0)).sum(axis=-1)
    # Measured: mean cosine 0.67 against 0.45 between unrelated paragraphs of the dense model.
    assert cosine.mean() > 0.6 and cosine.mean() > unrelated.mean() + 0.15
    # Every pruned embedding is still nearest to its own paragraph's dense embedding among 64.
    nearest = (pruned @ dense.T).argmax(axis=1)
    assert (nearest == np.arange(len(dense))).mean() >= 0.95


def prune_and_compare(minilm: MiniLM, tmp_path: Path, *options: str) -> float:
    """Mean cosine between dense and pruned sentence embeddings of held-out paragraphs."""
    out = tmp_path / f"pruned{abs(hash(options))}.onnx"
    applied = runner.invoke(app, ["apply", str(minilm.model), "--nm", "2:4", "-o", str(out), *options])
    assert applied.exit_code == 0, applied.output
    assert runner.invoke(app, ["check", str(out), "--nm", "2:4"]).exit_code == 0
    return float((embed(minilm.model, minilm) * embed(out, minilm)).sum(axis=-1).mean())


def test_calibrated_methods_beat_magnitude_on_held_out_sentences(minilm: MiniLM, tmp_path: Path) -> None:
    calib = tmp_path / "calib.npz"
    np.savez(calib, **minilm.calibration_feeds)  # Brown calibration paragraphs; evaluation uses held-out ones
    magnitude = prune_and_compare(minilm, tmp_path)
    wanda = prune_and_compare(minilm, tmp_path, "--method", "wanda", "--calib", str(calib), "--batch-size", "16")
    sequential = prune_and_compare(minilm, tmp_path, "--method", "wanda", "--calib", str(calib), "--sequential")
    sparsegpt = prune_and_compare(minilm, tmp_path, "--method", "sparsegpt", "--calib", str(calib), "--sequential")
    # Measured: magnitude 0.669, Wanda 0.727 (sequential 0.722), SparseGPT sequential 0.823.
    assert wanda > magnitude + 0.03 and sequential > magnitude + 0.03
    assert sparsegpt > wanda + 0.05
