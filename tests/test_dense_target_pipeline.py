"""Dense targets through sequential calibration: the cross-Gram matrices against numpy on the models' own
activations, ONNX Runtime's outputs of the pruned models against the dense model's, and segment-wise runs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper
from typer.testing import CliRunner

from graphprune.algorithms.pattern import NMPattern
from graphprune.algorithms.scores import Method
from graphprune.calibration.stats import ActivationStats
from graphprune.cli import app
from graphprune.graph.model_io import load_model, to_proto
from graphprune.graph.targets import Target
from graphprune.passes.prune import PruneConfig, PrunePass
from graphprune.pipeline.segments import prune_in_segments
from graphprune.pipeline.sequential import SequentialCalibration, dense_stream, prune_sequentially
from tests.decoder_models import decoder_like, feeds, request, save_external, weights_of
from tests.onnx_builders import init, initializer, make_model, run, tensor

HIDDEN, INNER = 16, 32
MATMULS = ["u1", "v1", "u2", "v2"]  # the outputs of a1, b1, a2, b2


def residual_blocks(weights: dict[str, np.ndarray], outputs: tuple[str, ...] = ("h2",)) -> onnx.ModelProto:
    """Two residual blocks h = h + relu(h A) B; ``outputs`` may expose the MatMuls' outputs for comparison."""
    nodes, h = [], "x"
    for block in (1, 2):
        nodes += [
            helper.make_node("MatMul", [h, f"a{block}"], [f"u{block}"]),
            helper.make_node("Relu", [f"u{block}"], [f"r{block}"]),
            helper.make_node("MatMul", [f"r{block}", f"b{block}"], [f"v{block}"]),
            helper.make_node("Add", [h, f"v{block}"], [f"h{block}"]),
        ]
        h = f"h{block}"
    return make_model(
        nodes,
        [tensor("x", shape=["b", HIDDEN])],
        [tensor(o) for o in outputs],
        [init(w, n) for n, w in weights.items()],
    )


def dense_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {"a1": (HIDDEN, INNER), "b1": (INNER, HIDDEN), "a2": (HIDDEN, INNER), "b2": (INNER, HIDDEN)}
    return {n: (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32) for n, s in shapes.items()}


def calibration(seed: int = 1) -> list[dict[str, np.ndarray]]:
    x = np.random.default_rng(seed).standard_normal((300, HIDDEN)).astype(np.float32)
    return [{"x": x[:100]}, {"x": x[100:200]}, {"x": x[200:]}]


def forward(weights: dict[str, np.ndarray], x: np.ndarray) -> dict[str, np.ndarray]:
    """numpy, float64: each weight's input activation by weight name."""
    acts, h = {}, x.astype(np.float64)
    for block in (1, 2):
        acts[f"a{block}"] = h
        r = np.maximum(h @ weights[f"a{block}"], 0)
        acts[f"b{block}"] = r
        h = h + r @ weights[f"b{block}"]
    return acts


def test_the_cross_gram_pairs_the_dense_and_the_pruned_prefix_activations() -> None:
    """What each group's solver receives: H = X_pᵀX_p and C = X_dᵀX_p, X_p with the earlier blocks as pruned."""
    dense = dense_weights()
    model = ir.from_proto(residual_blocks(dense))
    config = PruneConfig(NMPattern(2, 4), method=Method.SPARSEGPT, target="dense")
    batches = calibration()
    targets, _ = PrunePass(config=config).plan(model)
    received: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def prune_group(group: list[Target], stats: ActivationStats) -> None:
        received.update((t.name, (stats.gram[t.name], stats.cross[t.name])) for t in group)
        PrunePass(config=config, stats=stats, plan=(group, []))(model)

    engine = SequentialCalibration(model, batches, ["CPUExecutionProvider"], gram=True)
    engine.dense = dense_stream(model, targets, config, ["CPUExecutionProvider"])
    engine.run(targets, prune_group)

    x = np.concatenate([b["x"] for b in batches])
    pruned = {n: initializer(model, n) for n in dense}
    dense_acts = forward(dense, x)
    # block 1 is calibrated dense inside; block 2 on block 1 as pruned, itself still dense inside
    pruned_acts = {**dense_acts, **forward({**pruned, "a2": dense["a2"], "b2": dense["b2"]}, x)}
    pruned_acts["a1"], pruned_acts["b1"] = dense_acts["a1"], dense_acts["b1"]
    assert not np.allclose(pruned_acts["a2"], dense_acts["a2"])
    for name in dense:
        gram, cross = received[name]
        x_p, x_d = pruned_acts[name], dense_acts[name]
        np.testing.assert_allclose(gram, x_p.T @ x_p, rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(cross, x_d.T @ x_p, rtol=1e-5, atol=1e-3)
    for name in ("a1", "b1"):  # nothing pruned upstream: C = H
        np.testing.assert_array_equal(received[name][1], received[name][0])


def matmul_errors(weights: dict[str, np.ndarray], dense: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """ONNX Runtime: each MatMul's output, and the model's, against the dense model's (squared error)."""
    outputs = (*MATMULS, "h2")
    ours = run(residual_blocks(weights, outputs), {"x": x})
    theirs = run(residual_blocks(dense, outputs), {"x": x})
    return np.array([float(np.sum((a.astype(np.float64) - b) ** 2)) for a, b in zip(ours, theirs, strict=True)])


@pytest.mark.parametrize("method", [Method.SPARSEGPT, Method.ALPS])
def test_dense_targets_bring_the_pruned_model_closer_to_the_dense_one(method: Method) -> None:
    dense = dense_weights()
    batches = calibration()
    x = np.concatenate([b["x"] for b in batches])
    errors = {}
    for target in ("pruned", "dense"):
        model = ir.from_proto(residual_blocks(dense))
        prune_sequentially(model, PruneConfig(NMPattern(2, 4), method=method, target=target), batches)
        errors[target] = matmul_errors({n: initializer(model, n) for n in dense}, dense, x)
    # block 1 sees the same inputs either way; block 2 and the output come closer to the dense model's
    np.testing.assert_allclose(errors["dense"][:2], errors["pruned"][:2], rtol=1e-4)
    assert (errors["dense"][2:] <= errors["pruned"][2:]).all()
    assert errors["dense"][-1] < errors["pruned"][-1]


@pytest.mark.parametrize("max_memory", [None, 1])
def test_segment_wise_dense_targets_prune_as_the_in_memory_engine(tmp_path: Path, max_memory: int | None) -> None:
    """Bit for bit, also when every boundary tensor of both streams is spilled to disk."""
    path = save_external(decoder_like(), tmp_path / "in" / "model.onnx")
    config = PruneConfig(NMPattern(2, 4), method=Method.SPARSEGPT, target="dense")
    data = feeds()
    reference = load_model(path)
    batches, _ = request(data).batches(to_proto(reference))
    prune_sequentially(reference, config, batches)

    model = load_model(path)
    out = tmp_path / "out" / "pruned.onnx"
    plan = PrunePass(config=config).plan(model)
    _, _, memory = prune_in_segments(model, path.parent, out, config, request(data, max_memory), "block", plan)
    assert (memory.spilled_bytes > 0) == (max_memory is not None)
    got = weights_of(out)
    for name in ("a1", "b1", "a2", "b2", "a3", "b3"):
        np.testing.assert_array_equal(got[name], initializer(reference, name))
    wrong = replace(config, target="pruned")
    assert not np.array_equal(
        got["a3"], initializer(prune_sequentially(load_model(path), wrong, batches)[0].model, "a3")
    )


@pytest.mark.parametrize("method", [Method.SPARSEGPT, Method.ALPS])
def test_sequential_blends_zero_and_one_prune_as_the_pruned_and_dense_targets(method: Method) -> None:
    """Through the sequential engine: blend 0 gives --target pruned's weights, blend 1 --target dense's, and a
    half blend something between (block 2, the first with a pruned prefix, differs from both)."""
    dense, data = dense_weights(), calibration()
    pruned_weights = {}
    for name, options in {
        "pruned": {"target": "pruned"},
        "zero": {"target": "dense", "target_blend": 0.0},
        "dense": {"target": "dense"},
        "one": {"target": "dense", "target_blend": 1.0},
        "half": {"target": "dense", "target_blend": 0.5},
    }.items():
        model = ir.from_proto(residual_blocks(dense))
        prune_sequentially(model, PruneConfig(NMPattern(2, 4), method=method, **options), data)  # type: ignore[arg-type]
        pruned_weights[name] = {n: initializer(model, n) for n in dense}
    for n in dense:
        np.testing.assert_allclose(pruned_weights["zero"][n], pruned_weights["pruned"][n], atol=1e-5, rtol=0)
        np.testing.assert_array_equal(pruned_weights["one"][n], pruned_weights["dense"][n])
    assert not np.allclose(pruned_weights["half"]["a2"], pruned_weights["pruned"]["a2"], atol=1e-4)
    assert not np.allclose(pruned_weights["half"]["a2"], pruned_weights["dense"]["a2"], atol=1e-4)


def test_cli_dense_targets_and_swaps(tmp_path: Path) -> None:
    path = tmp_path / "blocks.onnx"
    path.write_bytes(residual_blocks(dense_weights()).SerializeToString())
    np.savez(tmp_path / "calib.npz", x=np.concatenate([b["x"] for b in calibration()]))
    runner = CliRunner()
    base = [
        "apply",
        str(path),
        "--calib",
        str(tmp_path / "calib.npz"),
        "--include-head",
        "-o",
        str(tmp_path / "o.onnx"),
    ]
    ok = runner.invoke(app, [*base, "--method", "alps", "--sequential", "--target", "dense", "--swaps", "8"])
    assert ok.exit_code == 0, ok.output
    # --target-blend reaches the pass: the CLI's blend-0.5 model is the engine's, not the dense target's
    blended = [*base[:-1], str(tmp_path / "b.onnx"), "--method", "alps", "--sequential", "--target", "dense"]
    ok = runner.invoke(app, [*blended, "--target-blend", "0.5", "--batch-size", "100"])
    assert ok.exit_code == 0, ok.output
    got = initializer(onnx.load(tmp_path / "b.onnx"), "a2")
    for blend, same in ((0.5, True), (1.0, False)):
        model = ir.from_proto(residual_blocks(dense_weights()))
        config = PruneConfig(NMPattern(2, 4), method=Method.ALPS, target="dense", target_blend=blend)
        prune_sequentially(model, config, calibration())
        assert np.allclose(got, initializer(model, "a2"), atol=1e-6) == same
    check = runner.invoke(app, ["check", str(tmp_path / "o.onnx"), "--include-head", "--no-eligibility"])
    assert check.exit_code == 0, check.output
    for extra, message in (
        (["--method", "alps", "--target", "dense"], "needs --sequential"),
        (["--method", "wanda", "--sequential", "--target", "dense"], "sparsegpt and alps"),
        (["--method", "sparsegpt", "--sequential", "--target", "densest"], "'pruned' or 'dense'"),
        (["--method", "wanda", "--swaps", "3"], "sparsegpt and alps"),
        (["--method", "alps", "--sequential", "--target", "dense", "--target-blend", "1.5"], "--target-blend"),
        (["--method", "alps", "--sequential", "--target-blend", "0.5"], "needs --target"),
    ):
        (tmp_path / "bad.onnx").unlink(missing_ok=True)
        bad = runner.invoke(app, [*base[:-1], str(tmp_path / "bad.onnx"), *extra])
        assert bad.exit_code == 2 and message in bad.output and "Traceback" not in bad.output, bad.output
        assert not (tmp_path / "bad.onnx").exists()
