"""What the command line prints: 80-column tables, --json documents that carry the table's numbers, one display.

Every command runs through typer's CliRunner with COLUMNS=80; the numbers are checked against numpy on the
written model (zeros per weight) or on ONNX Runtime's outputs of the two models (cosine).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from typer.testing import CliRunner

from graphprune.algorithms.pattern import NMPattern
from graphprune.algorithms.scores import Method
from graphprune.calibration.request import CalibrationRequest
from graphprune.cli import app
from graphprune.cli.app import COMMAND_ORDER
from graphprune.cli.tables import shorten
from graphprune.passes.prune import PruneConfig
from graphprune.pipeline.files import prune_file
from graphprune.pipeline.progress import PruneProgress
from tests.onnx_builders import init, make_model, run, tensor

runner = CliRunner(env={"COLUMNS": "80"})
# Names as long as a transformer's, distinct only at both ends.
NAMES = [
    "model.layers.0.self_attention_block.query_key_value_projection.weight",
    "model.layers.0.feed_forward_block.intermediate_dense_projection.weight",
    "model.layers.1.feed_forward_block.output_dense_projection_to_hidden.weight",
]
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def long_named_model(seed: int = 0) -> onnx.ModelProto:
    """x[., 32] -> MatMul -> Relu -> MatMul -> Relu -> MatMul -> y[., 32], with long weight names."""
    rng = np.random.default_rng(seed)
    shapes = [(32, 64), (64, 64), (64, 32)]
    nodes, inputs = [], "x"
    for i, name in enumerate(NAMES):
        nodes.append(helper.make_node("MatMul", [inputs, name], [f"h{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"))
        inputs = f"r{i}"
    nodes[-1] = helper.make_node("Identity", ["h2"], ["y"], name="out")
    weights = [init(rng.standard_normal(s).astype(np.float32), n) for s, n in zip(shapes, NAMES, strict=True)]
    return make_model(nodes, [tensor("x", shape=["b", 32])], [tensor("y", shape=["b", 32])], weights)


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save_model(long_named_model(), str(path))
    return path


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, ANSI.sub("", result.stdout), ANSI.sub("", result.output)


def assert_fits_80(text: str) -> None:
    too_wide = [line for line in text.splitlines() if len(line) > 80]
    assert not too_wide, too_wide


def table_rows(text: str) -> list[str]:
    """The body of the first table in ``text``: the lines after the header's rule up to the first blank line
    or line that no longer has the table's columns."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if set(line.strip()) == {"─"}) + 1
    body = []
    for line in lines[start:]:
        if not line.strip() or "  " not in line.strip():
            break
        body.append(line)
    return body


def zeros_by_name(path: Path) -> dict[str, float]:
    model = onnx.load(str(path))
    return {t.name: float(np.mean(numpy_helper.to_array(t) == 0)) for t in model.graph.initializer}


def test_shorten_keeps_both_ends() -> None:
    assert shorten("abc", 5) == "abc"
    short = shorten(NAMES[0], 20)
    assert len(short) == 20 and short.count("…") == 1
    head, tail = short.split("…")
    assert NAMES[0].startswith(head) and NAMES[0].endswith(tail) and len(tail) > len(head)


def test_help_lists_commands_in_workflow_order_within_80_columns() -> None:
    code, stdout, _ = invoke("--help")
    assert code == 0
    assert_fits_80(stdout)
    listed = re.findall(r"^│ (\w+)\s{2,}", stdout, flags=re.MULTILINE)
    expected = [name for name in COMMAND_ORDER if name in listed]
    assert listed[: len(expected)] == expected and len(expected) >= 7
    for command in listed:
        code, text, _ = invoke(command, "--help")
        assert code == 0
        assert_fits_80(text)


def test_apply_table_and_json_agree_with_the_written_model(model_path: Path, tmp_path: Path) -> None:
    code, table, _ = invoke("apply", model_path, "--include-head", "-o", tmp_path / "p.onnx")
    assert code == 0
    assert_fits_80(table)
    code, document, _ = invoke("apply", model_path, "--include-head", "-o", tmp_path / "q.onnx", "--json")
    assert code == 0
    summary = json.loads(document)  # the whole of stdout is one JSON document
    zeros = zeros_by_name(tmp_path / "q.onnx")
    sizes = {t.name: t.dims[0] * t.dims[1] for t in long_named_model().graph.initializer}
    expected = sum(zeros[n] * sizes[n] for n in NAMES) / sum(sizes.values())
    assert summary["pruned"] == 3 and summary["skipped"] == []
    assert summary["sparsity_achieved"] == pytest.approx(expected) == pytest.approx(0.5)
    assert f"{summary['sparsity_achieved']:.2%} of pruned weights" in table
    assert re.search(rf"pruned\s+{summary['pruned']}\b", table)


def test_check_table_fits_80_columns_and_json_carries_its_numbers(model_path: Path, tmp_path: Path) -> None:
    pruned = tmp_path / "p.onnx"
    assert invoke("apply", model_path, "--include-head", "-o", pruned)[0] == 0
    code, table, _ = invoke("check", pruned, "--include-head")
    assert code == 0
    assert_fits_80(table)
    zeros = zeros_by_name(pruned)
    document = json.loads(invoke("check", pruned, "--include-head", "--json")[1])
    assert document["ok"] is True
    rows = table_rows(table)
    assert len(rows) == len(document["weights"]) == 3
    assert len({row.split()[0] for row in rows}) == 3  # shortened names stay distinct
    for weight, row in zip(document["weights"], rows, strict=True):
        assert weight["sparsity"] == pytest.approx(zeros[weight["name"]])
        # one line per weight: its name shortened from the middle, the same numbers
        head, tail = row.split()[0].split("…")
        assert weight["name"].startswith(head) and weight["name"].endswith(tail)
        assert f"{weight['sparsity']:.1%}" in row
        (record,) = [r for r in document["tensorrt_eligibility"] if r["name"] == weight["name"]]
        assert f"{record['out_channels']} x {record['k']}" in row and record["precision"] in row


def test_check_exit_code_and_violation_rows(model_path: Path) -> None:
    code, table, _ = invoke("check", model_path, "--include-head")  # dense: every weight violates 2:4
    assert code == 1
    assert_fits_80(table)
    document = json.loads(invoke("check", model_path, "--include-head", "--json")[1])
    for weight in document["weights"]:
        assert f"{weight['bad_groups']}/" in table
    assert "FAILS in 3 weights" in table


def test_eval_table_and_json_match_onnxruntime(model_path: Path, tmp_path: Path) -> None:
    pruned = tmp_path / "p.onnx"
    assert invoke("apply", model_path, "--include-head", "-o", pruned)[0] == 0
    x = np.random.default_rng(1).standard_normal((6, 32)).astype(np.float32)
    np.savez(tmp_path / "heldout.npz", x=x)
    args = ["eval", model_path, pruned, "--calib", tmp_path / "heldout.npz", "--batch-size", "4"]
    code, table, _ = invoke(*args)
    assert code == 0
    assert_fits_80(table)
    (row,) = json.loads(invoke(*args, "--json")[1])["outputs"]
    (a,), (b,) = run(onnx.load(str(model_path)), {"x": x}), run(onnx.load(str(pruned)), {"x": x})
    a, b = a.astype(np.float64), b.astype(np.float64)
    cosine = np.mean((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
    assert row["cosine"] == pytest.approx(cosine, rel=1e-6)
    assert re.search(rf"^y\s+6\s+{row['cosine']:.4f}\s+{row['relative_l2']:.4f}\s", table, flags=re.MULTILINE)


def test_calibrate_table_and_json_match_the_data(model_path: Path, tmp_path: Path) -> None:
    x = np.random.default_rng(2).standard_normal((10, 32)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    args = ["calibrate", model_path, "--calib", tmp_path / "calib.npz", "--batch-size", "4", "-q"]
    code, table, _ = invoke(*args, "-o", tmp_path / "a.npz")
    assert code == 0
    assert_fits_80(table)
    document = json.loads(invoke(*args, "-o", tmp_path / "b.npz", "--json")[1])
    weights = {w["name"]: w for w in document["weights"]}
    assert {n: (w["k"], w["rows"]) for n, w in weights.items()} == {
        NAMES[0]: (32, 10),
        NAMES[1]: (64, 10),
        NAMES[2]: (64, 10),
    }
    for weight, row in zip(document["weights"], table_rows(table), strict=True):
        assert re.search(rf"\s{weight['k']}\s+{weight['rows']}\s", row)


def test_prune_file_reports_calibration_progress_through_its_callback(model_path: Path, tmp_path: Path) -> None:
    """apply --method sparsegpt --calib: the library calls back (no bar of its own), the CLI draws one display."""
    x = np.random.default_rng(3).standard_normal((10, 32)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    calls: list[tuple[int, int | None]] = []
    weights: list[str] = []

    class Heard(PruneProgress):
        def calibrated(self, samples_done: int, samples_total: int | None) -> None:
            calls.append((samples_done, samples_total))

        def weight_pruned(self, name: str) -> None:
            weights.append(name)

    config = PruneConfig(NMPattern(2, 4), method=Method.SPARSEGPT, include_head=True)
    request = CalibrationRequest(data=str(tmp_path / "calib.npz"), batch_size=4)
    prune_file(model_path, config, tmp_path / "p.onnx", calibration=request, progress=Heard())
    assert calls == [(4, 10), (8, 10), (10, 10)] and sorted(weights) == sorted(NAMES)
    code, _, output = invoke(
        "apply", model_path, "--method", "sparsegpt", "--calib", tmp_path / "calib.npz", "--include-head",
        "-o", tmp_path / "q.onnx",
    )  # fmt: skip
    assert code == 0 and "samples/s" not in output  # the transient display leaves nothing behind


@pytest.mark.gpu
def test_bench_torch_table_and_json_on_a_gpu(model_path: Path, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs PyTorch with a CUDA GPU of compute capability >= 8.0")
    pruned = tmp_path / "p.onnx"
    assert invoke("apply", model_path, "--include-head", "-o", pruned)[0] == 0
    args = ["bench", pruned, "--backend", "torch", "--tokens", "256", "--iterations", "5"]
    code, table, _ = invoke(*args)
    assert code == 0
    assert_fits_80(table)
    document = json.loads(invoke(*args, "--json")[1])
    assert sorted(g["name"] for g in document["gemms"]) == sorted(NAMES)
    for gemm in document["gemms"]:
        assert gemm["tokens"] == 256 and gemm["dense_ms"] > 0
        if gemm["sparse_ms"]:
            assert gemm["dense_over_sparse"] == pytest.approx(gemm["dense_ms"] / gemm["sparse_ms"])
    assert len(table_rows(table)) == len(NAMES)


def test_eval_on_text_windows_matches_numpy(tmp_path: Path) -> None:
    """eval --calib TEXT --tokenizer: the quickstart's comparison, on seeded windows drawn as documented."""
    import random

    from tests.bigram import bigram_pair_and_text

    rng = np.random.default_rng(7)
    dense_table, pruned_table, ids, tokenizer = bigram_pair_and_text(tmp_path, rng, 1.0, 200, with_mask=False)
    args = ["eval", tmp_path / "dense.onnx", tmp_path / "pruned.onnx", "--calib", tmp_path / "heldout.txt"]
    args += ["--tokenizer", tokenizer, "--seqlen", "8", "--windows", "5", "--batch-size", "2"]
    code, table, _ = invoke(*args)
    assert code == 0
    assert_fits_80(table)
    (row,) = json.loads(invoke(*args, "--json")[1])["outputs"]
    draw = random.Random(0)  # the reference loaders' rule: seeded randint starts, no special tokens
    windows = np.stack([ids[s : s + 8] for s in [draw.randint(0, len(ids) - 8 - 1) for _ in range(5)]])
    a = dense_table.astype(np.float32)[windows].astype(np.float64).reshape(5, -1)
    b = pruned_table.astype(np.float32)[windows].astype(np.float64).reshape(5, -1)
    cosine = np.mean((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
    assert row["samples"] == 5 and row["cosine"] == pytest.approx(cosine, rel=1e-6)
    assert f"{row['cosine']:.4f}" in table
