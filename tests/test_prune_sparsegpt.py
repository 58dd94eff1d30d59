"""SparseGPT through the pruning pass: the weight is updated in its stored layout, checked in ONNX Runtime."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from graphprune.algorithms.masks import nm_violations
from graphprune.algorithms.pattern import NMPattern
from graphprune.algorithms.scores import Method
from graphprune.algorithms.sparsegpt import sparsegpt
from graphprune.errors import GraphpruneError
from graphprune.passes.prune import PruneConfig, PrunePass
from tests.onnx_builders import init, initializer, linear_model, residual_blocks_model, run, tensor
from tests.onnx_builders import make_ir_model as make_model


def correlated_inputs(rng: np.random.Generator, rows: int, k: int) -> np.ndarray:
    mixing = rng.standard_normal((k, k)) * 0.3 + np.eye(k) * rng.uniform(0.2, 3.0, size=k)
    return (rng.standard_normal((rows, k)) @ mixing).astype(np.float32)


def test_sparsegpt_updates_the_stored_weight_and_beats_wanda() -> None:
    rng = np.random.default_rng(1100)  # this function's own data, whatever ran before
    w = rng.standard_normal((24, 32)).astype(np.float32)  # [N, K]
    x = correlated_inputs(rng, 256, 32)
    gram = x.astype(np.float64).T @ x.astype(np.float64)
    stats = SimpleNamespace(sumsq={"w": np.diag(gram).copy()}, gram={"w": gram})
    pattern = NMPattern(2, 4)

    model = linear_model(w)
    PrunePass(
        config=PruneConfig(pattern, method=Method.SPARSEGPT, include_head=True, blocksize=16), stats=stats
    ).call(model)
    pruned = initializer(model, "w")
    expected = sparsegpt(w, gram, pattern, blocksize=16)  # canonical (out, K) is the stored [N, K] here
    np.testing.assert_allclose(pruned, expected, rtol=1e-6, atol=1e-6)
    assert nm_violations(pruned, pattern).size == 0

    wanda_model = linear_model(w)
    PrunePass(config=PruneConfig(pattern, method=Method.WANDA, include_head=True), stats=stats).call(wanda_model)
    dense_out = x @ w.T
    error = np.linalg.norm(run(model, {"x": x})[0] - dense_out)
    wanda_error = np.linalg.norm(run(wanda_model, {"x": x})[0] - dense_out)
    assert error < 0.9 * wanda_error


@pytest.mark.parametrize("method", [Method.SPARSEGPT, Method.ALPS])
def test_reconstruction_without_gram_matrices_is_refused_with_the_way_to_get_them(method: Method) -> None:
    rng = np.random.default_rng(1101)  # this function's own data, whatever ran before
    w = rng.standard_normal((8, 8)).astype(np.float32)
    stats = {"w": np.ones(8)}  # Σx² only
    with pytest.raises(GraphpruneError, match="Gram") as refused:
        PrunePass(config=PruneConfig(method=method, include_head=True), stats=stats).call(linear_model(w))
    message = str(refused.value)
    assert method.value in message and "`gram=True`" in message and "\n" not in message


def test_sparsegpt_skips_quantized_weights_with_a_reason() -> None:
    rng = np.random.default_rng(1102)  # this function's own data, whatever ran before
    q = rng.integers(-100, 100, size=(8, 4), dtype=np.int8)
    model = make_model(
        [
            helper.make_node("DequantizeLinear", ["q", "s"], ["w"]),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        [tensor("x", shape=[2, 8])],
        [tensor("y")],
        [init(q, "q"), init(np.array(0.1, np.float32), "s")],
    )
    stats = SimpleNamespace(sumsq={}, gram={})
    result = PrunePass(config=PruneConfig(method=Method.SPARSEGPT, include_head=True), stats=stats).call(model)
    (skipped,) = result.skipped
    assert "quantized" in skipped.skipped


def test_one_shot_grams_over_the_memory_budget_are_spilled_with_the_same_result(tmp_path) -> None:
    rng = np.random.default_rng(1103)  # this function's own data, whatever ran before
    from graphprune.calibration.gram_budget import chunks_within, gram_bytes
    from graphprune.calibration.request import CalibrationRequest
    from graphprune.graph.targets import find_targets
    from graphprune.pipeline.files import prune_file

    model, _ = residual_blocks_model()
    path = tmp_path / "blocks.onnx"
    path.write_bytes(model.SerializeToString())
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((16, 8)).astype(np.float32))
    targets = find_targets(ir.from_proto(model)).targets
    budget_gb = gram_bytes(targets[:1]) / 2**30  # room for one Gram at a time: four passes
    assert len(chunks_within(targets, gram_bytes(targets[:1]))) == 4

    outputs = {}
    for label, memory in (("together", 4.0), ("spilled", budget_gb)):
        request = CalibrationRequest(str(tmp_path / "calib.npz"), gram_memory_gb=memory)
        out, result = prune_file(
            path, PruneConfig(NMPattern(2, 4), method=Method.SPARSEGPT, include_head=True),
            tmp_path / f"{label}.onnx",
            calibration=request,
        )  # fmt: skip
        assert len(result.pruned) == 4
        outputs[label] = {t.name: initializer(onnx.load(str(out)), t.name) for t in targets}
    for name, weight in outputs["together"].items():
        np.testing.assert_array_equal(outputs["spilled"][name], weight)


def test_saved_gram_matrices_serve_a_sparsegpt_prune(tmp_path) -> None:
    rng = np.random.default_rng(1104)  # this function's own data, whatever ran before
    from typer.testing import CliRunner

    from graphprune.cli import app

    model, _ = residual_blocks_model()
    path = tmp_path / "blocks.onnx"
    path.write_bytes(model.SerializeToString())
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((16, 8)).astype(np.float32))
    runner = CliRunner()
    stats, calib = str(tmp_path / "stats.npz"), str(tmp_path / "calib.npz")
    base = ["apply", str(path), "--method", "sparsegpt", "--include-head"]
    assert runner.invoke(app, ["calibrate", str(path), "--calib", calib, "-o", stats, "-q"]).exit_code == 0
    refused = runner.invoke(app, [*base, "--stats", stats, "-o", str(tmp_path / "a.onnx")])
    assert refused.exit_code == 2 and "Gram" in refused.output  # Σx² alone is not enough for SparseGPT

    assert (
        runner.invoke(
            app, ["calibrate", str(path), "--calib", calib, "-o", stats, "--gram", "-q", "--force"]
        ).exit_code
        == 0
    )
    from_stats = runner.invoke(app, [*base, "--stats", stats, "-o", str(tmp_path / "b.onnx")])
    assert from_stats.exit_code == 0, from_stats.output
    in_one_go = runner.invoke(app, [*base, "--calib", calib, "-o", str(tmp_path / "c.onnx")])
    assert in_one_go.exit_code == 0, in_one_go.output
    b, c = onnx.load(str(tmp_path / "b.onnx")), onnx.load(str(tmp_path / "c.onnx"))
    for name in ("a1", "b1", "a2", "b2"):
        np.testing.assert_array_equal(initializer(b, name), initializer(c, name))
