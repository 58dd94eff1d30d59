"""ALPS through the pruning pass, one-shot and sequential, and from saved Gram statistics."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper
from typer.testing import CliRunner

from graphprune.algorithms.alps import alps, alps_solve_shared
from graphprune.algorithms.masks import nm_violations
from graphprune.algorithms.pattern import NMPattern
from graphprune.algorithms.scores import Method
from graphprune.calibration.request import CalibrationRequest
from graphprune.cli import app
from graphprune.graph.model_io import load_model
from graphprune.passes.prune import PruneConfig, PrunePass
from graphprune.pipeline.segments import prune_in_segments
from graphprune.pipeline.sequential import prune_sequentially
from tests.decoder_models import decoder_like, feeds, save_external
from tests.onnx_builders import init, initializer, linear_model, make_model, residual_blocks_model, run, tensor
from tests.references import correlated_inputs

PATTERN = NMPattern(2, 4)


@pytest.fixture
def blocks():
    """Two residual blocks (``tests/onnx_builders.py``), drawn from their own seed."""
    return residual_blocks_model()


def test_alps_writes_its_solution_into_the_stored_layout_and_beats_sparsegpt() -> None:
    rng = np.random.default_rng(1200)  # this function's own data, whatever ran before
    w = rng.standard_normal((24, 32)).astype(np.float32)  # stored [N, K] behind a Transpose
    x = correlated_inputs(rng, 32).astype(np.float32)
    gram = x.astype(np.float64).T @ x.astype(np.float64)
    stats = SimpleNamespace(sumsq={"w": np.diag(gram).copy()}, gram={"w": gram})
    pruned = {}
    for method in (Method.ALPS, Method.SPARSEGPT):
        model = linear_model(w)
        result = PrunePass(config=PruneConfig(PATTERN, method=method, include_head=True), stats=stats).call(model)
        assert result.pruned[0].method == method.value
        pruned[method] = model
    stored = initializer(pruned[Method.ALPS], "w")
    np.testing.assert_allclose(stored, alps(w, gram, PATTERN), rtol=1e-6, atol=1e-6)
    assert nm_violations(stored, PATTERN).size == 0

    dense = x @ w.T
    errors = {m: np.linalg.norm(run(model, {"x": x})[0] - dense) for m, model in pruned.items()}
    assert errors[Method.ALPS] <= errors[Method.SPARSEGPT]


def test_sequential_alps_calibrates_each_block_on_the_pruned_ones_before_it(blocks) -> None:
    rng = np.random.default_rng(1201)  # this function's own data, whatever ran before
    proto, w = blocks
    model = ir.from_proto(proto)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    prune_sequentially(
        model, PruneConfig(PATTERN, method=Method.ALPS, include_head=True), [{"x": x[:40]}, {"x": x[40:]}]
    )

    def reference(weight_kn: np.ndarray, inputs: np.ndarray) -> np.ndarray:  # MatMul B [K, N]: canonical is Bᵀ
        inputs = inputs.astype(np.float64)
        return alps(weight_kn.T, inputs.T @ inputs, PATTERN).T

    a1 = reference(w["a1"], x)
    b1 = reference(w["b1"], np.maximum(x @ w["a1"], 0))  # inside a block: A still dense
    h1 = x + np.maximum(x @ a1, 0) @ b1
    a2 = reference(w["a2"], h1)
    b2 = reference(w["b2"], np.maximum(h1 @ w["a2"], 0))
    for name, expected in (("a1", a1), ("b1", b1), ("a2", a2), ("b2", b2)):
        got = initializer(model, name)
        np.testing.assert_array_equal(got != 0, expected != 0)
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)


def test_saved_gram_matrices_serve_alps_as_calibrating_in_one_go(tmp_path, blocks) -> None:
    rng = np.random.default_rng(1202)  # this function's own data, whatever ran before
    model, _ = blocks
    path = tmp_path / "blocks.onnx"
    path.write_bytes(model.SerializeToString())
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((16, 8)).astype(np.float32))
    runner = CliRunner()
    stats, calib = str(tmp_path / "stats.npz"), str(tmp_path / "calib.npz")
    saved = runner.invoke(app, ["calibrate", str(path), "--calib", calib, "-o", stats, "--gram", "-q"])
    assert saved.exit_code == 0, saved.output
    written = {}
    for source in (["--stats", stats], ["--calib", calib]):
        out = tmp_path / f"{source[0][2:]}.onnx"
        result = runner.invoke(
            app, ["apply", str(path), "--method", "alps", "--include-head", *source, "-o", str(out)]
        )
        assert result.exit_code == 0, result.output
        written[source[0]] = onnx.load(str(out))
    for name in ("a1", "b1", "a2", "b2"):
        stored = initializer(written["--stats"], name)
        np.testing.assert_array_equal(stored, initializer(written["--calib"], name))
        assert nm_violations(stored.T, PATTERN).size == 0  # K is axis 0 of a MatMul B
    check = runner.invoke(app, ["check", str(tmp_path / "stats.onnx"), "--include-head", "--no-eligibility"])
    assert check.exit_code == 0, check.output


def shared_input_model(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Q/K/V-like MatMuls (B stored [K, N]) that all read x."""
    names = list(weights)
    return make_model(
        [helper.make_node("MatMul", ["x", n], [f"y_{n}"]) for n in names],
        [tensor("x", shape=[None, 16])],
        [tensor(f"y_{n}") for n in names],
        [init(w, n) for n, w in weights.items()],
    )


@pytest.mark.parametrize("sequential", [False, True])
def test_the_weights_that_read_one_input_are_solved_together(tmp_path, sequential: bool) -> None:
    rng = np.random.default_rng(13)
    weights = {
        n: rng.standard_normal((16, cols)).astype(np.float32) for n, cols in (("q", 16), ("k", 4), ("v", 8))
    }
    path = tmp_path / "qkv.onnx"
    path.write_bytes(shared_input_model(weights).SerializeToString())
    x = correlated_inputs(rng, 16, rows=96).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    out = tmp_path / "pruned.onnx"
    args = ["apply", str(path), "--method", "alps", "--include-head", "--calib", str(tmp_path / "calib.npz")]
    result = CliRunner().invoke(app, [*args, "-o", str(out), *(["--sequential"] if sequential else [])])
    assert result.exit_code == 0, result.output

    h = x.astype(np.float64).T @ x.astype(np.float64)
    expected = alps_solve_shared([w.T for w in weights.values()], h, PATTERN, device="numpy")  # canonical Bᵀ
    written = onnx.load(str(out))
    for name, solved in zip(weights, expected, strict=True):
        got = initializer(written, name)
        np.testing.assert_array_equal(got != 0, solved.keep.T)
        np.testing.assert_allclose(got, solved.weight.T, rtol=1e-3, atol=1e-4)


def test_a_model_with_external_data_runs_alps_segment_by_segment_as_in_memory(tmp_path) -> None:
    dense, data = decoder_like(), feeds()
    config = PruneConfig(PATTERN, method=Method.ALPS)
    in_memory = ir.from_proto(dense)
    batches, _ = CalibrationRequest(data=data, batch_size=2).batches(dense)
    prune_sequentially(in_memory, config, batches)

    path = save_external(dense, tmp_path / "in" / "model.onnx")
    model = load_model(path)
    out = tmp_path / "out" / "pruned.onnx"
    plan = PrunePass(config=config).plan(model)
    prune_in_segments(model, path.parent, out, config, CalibrationRequest(data=data, batch_size=2), "block", plan)
    written = onnx.load(str(out))
    for name in ("a1", "b1", "a2", "b2", "a3", "b3"):
        np.testing.assert_array_equal(initializer(written, name), initializer(in_memory, name))
        assert nm_violations(initializer(written, name).T, PATTERN).size == 0
