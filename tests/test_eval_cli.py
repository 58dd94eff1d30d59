"""``graphprune eval``: perplexity of two bigram models on text, and output agreement on npz data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from typer.testing import CliRunner

from graphprune.cli import app
from graphprune.evaluate.perplexity import text_windows
from tests.bigram import VOCAB, bigram_model, bigram_pair_and_text, expected_perplexity

runner = CliRunner()


def test_perplexity_of_both_models_matches_numpy(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    dense_table, pruned_table, ids, tokenizer = bigram_pair_and_text(tmp_path, rng, 2.0, 300, with_mask=True)

    result = runner.invoke(
        app,
        [
            "eval", str(tmp_path / "dense.onnx"), str(tmp_path / "pruned.onnx"),
            "--text", str(tmp_path / "heldout.txt"), "--tokenizer", str(tokenizer),
            "--seqlen", "16", "--windows", "5", "--offset", "7", "--json",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["bos"] == "<s> (id 0)" and report["windows"] == [5, 17]
    windows = np.concatenate([np.zeros((5, 1), np.int64), ids[7 : 7 + 80].reshape(5, 16)], axis=1)
    assert np.isclose(report["perplexity_dense"], expected_perplexity(dense_table, windows), rtol=1e-6)
    assert np.isclose(report["perplexity_pruned"], expected_perplexity(pruned_table, windows), rtol=1e-6)


def test_output_agreement_matches_numpy(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    dense_table = rng.standard_normal((VOCAB, VOCAB))
    pruned_table = dense_table + 0.3 * rng.standard_normal((VOCAB, VOCAB))
    for name, table in (("dense", dense_table), ("pruned", pruned_table)):
        onnx.save(bigram_model(table, with_mask=False), str(tmp_path / f"{name}.onnx"))
    input_ids = rng.integers(0, VOCAB, size=(10, 6))
    np.savez(tmp_path / "heldout.npz", input_ids=input_ids)

    args = [
        "eval",
        str(tmp_path / "dense.onnx"),
        str(tmp_path / "pruned.onnx"),
        "--calib",
        str(tmp_path / "heldout.npz"),
    ]
    result = runner.invoke(app, [*args, "--batch-size", "3", "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["outputs"]

    a = dense_table.astype(np.float32)[input_ids].astype(np.float64)
    b = pruned_table.astype(np.float32)[input_ids].astype(np.float64)
    flat_a, flat_b = a.reshape(10, -1), b.reshape(10, -1)
    cosine = np.mean((flat_a * flat_b).sum(1) / np.linalg.norm(flat_a, axis=1) / np.linalg.norm(flat_b, axis=1))
    assert row["samples"] == 10
    assert np.isclose(row["cosine"], cosine, rtol=1e-6)
    assert np.isclose(row["relative_l2"], np.linalg.norm(a - b) / np.linalg.norm(a), rtol=1e-6)
    assert row["top1_agreement"] == (a.argmax(-1) == b.argmax(-1)).mean()


def test_text_windows_without_bos_are_plain_slices() -> None:
    np.testing.assert_array_equal(text_windows(np.arange(10), 3, offset=1), [[1, 2, 3], [4, 5, 6], [7, 8, 9]])


def test_eval_needs_data() -> None:
    result = runner.invoke(app, ["eval", "a.onnx", "b.onnx"])
    assert result.exit_code == 2 and "nothing to evaluate" in result.output


def test_missing_or_unreadable_models_are_one_line_errors(tmp_path: Path) -> None:
    dense = tmp_path / "dense.onnx"
    onnx.save(bigram_model(np.eye(VOCAB), with_mask=False), str(dense))
    np.savez(tmp_path / "heldout.npz", input_ids=np.zeros((2, 3), np.int64))
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(dense.read_bytes()[:40])
    for pruned in (tmp_path / "missing.onnx", broken):
        result = runner.invoke(app, ["eval", str(dense), str(pruned), "--calib", str(tmp_path / "heldout.npz")])
        assert result.exit_code == 2 and result.output.count("\n") <= 2, result.output
        assert str(pruned.name) in result.output and "Traceback" not in result.output
