"""Mask refinement by swaps: the objective never rises, the pattern holds, the closed form is the real error."""

from __future__ import annotations

import numpy as np
import pytest

from graphprune.algorithms.alps import alps_solve
from graphprune.algorithms.masks import mask_from_scores, nm_violations
from graphprune.algorithms.pattern import NMPattern, Pattern, Scope, Unstructured
from graphprune.algorithms.sparsegpt import sparsegpt_with_mask
from graphprune.algorithms.swaps import layer_objective, swap_refine

PATTERNS = [NMPattern(2, 4), NMPattern(4, 8), Unstructured(0.5), Unstructured(0.6, Scope.LAYER)]


def correlated_inputs(rng: np.random.Generator, k: int, rows: int = 512) -> np.ndarray:
    """Calibration rows with correlated channels of very different scales, as in an LLM."""
    cov = 0.8 ** np.abs(np.subtract.outer(np.arange(k), np.arange(k)))
    x = (rng.standard_normal((rows, k)) @ np.linalg.cholesky(cov).T)[:, rng.permutation(k)]
    return x * rng.gamma(2.0, 1.0, size=k)


def solved(w: np.ndarray, h: np.ndarray, pattern: Pattern, solver: str) -> tuple[np.ndarray, np.ndarray]:
    """A starting point: a solver's weight and mask, or the magnitude mask with the weights left as they are."""
    if solver == "sparsegpt":
        return sparsegpt_with_mask(w, h, pattern)
    if solver == "alps":
        result = alps_solve(w, h, pattern)
        return result.weight, result.keep
    keep = mask_from_scores(np.abs(w), pattern)
    return np.where(keep, w, 0.0), keep


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("solver", ["magnitude", "sparsegpt", "alps"])
def test_a_swap_never_raises_the_objective_and_the_pattern_holds(pattern: Pattern, solver: str) -> None:
    for seed in range(4):
        rng = np.random.default_rng(seed)
        x = correlated_inputs(rng, 32)
        h = x.T @ x
        w = rng.standard_normal((6, 32))
        start, keep = solved(w, h, pattern, solver)
        result = swap_refine(w, start, h, pattern, budget=20, keep=keep)
        before = layer_objective(w, start, h, 0.01)
        after = layer_objective(w, result.weight, h, 0.01)  # computed afresh, not the refinement's own record
        assert after <= before * (1 + 1e-12)
        assert result.objective_before == pytest.approx(before, rel=1e-9)
        assert result.objective_after == pytest.approx(after, rel=1e-9)
        assert not result.weight[~result.keep].any()  # pruned positions hold exact zeros
        if isinstance(pattern, NMPattern):
            assert not nm_violations(result.weight, pattern).any()
            groups = result.keep.reshape(6, -1, pattern.group).sum(axis=2)
            assert (groups == keep.reshape(6, -1, pattern.group).sum(axis=2)).all()  # each group keeps its count
        else:
            assert (result.keep.sum(axis=1) == keep.sum(axis=1)).all()  # each row keeps its count


@pytest.mark.parametrize("pattern", [NMPattern(2, 4), Unstructured(0.5)], ids=str)
def test_swaps_repair_a_poor_mask(pattern: Pattern) -> None:
    """From magnitude's mask on correlated inputs there is much to gain; the error falls well below it."""
    rng = np.random.default_rng(7)
    x = correlated_inputs(rng, 64)
    h = x.T @ x
    w = rng.standard_normal((8, 64))
    start, keep = solved(w, h, pattern, "magnitude")
    result = swap_refine(w, start, h, pattern, budget=64, keep=keep)
    assert result.swaps > 0
    assert layer_objective(w, result.weight, h, 0.0) < 0.7 * layer_objective(w, start, h, 0.0)


def test_no_budget_changes_nothing() -> None:
    rng = np.random.default_rng(3)
    x = correlated_inputs(rng, 16)
    w = rng.standard_normal((4, 16))
    start, keep = solved(w, x.T @ x, NMPattern(2, 4), "sparsegpt")
    result = swap_refine(w, start, x.T @ x, NMPattern(2, 4), budget=0, keep=keep)
    assert result.swaps == 0
    np.testing.assert_array_equal(result.weight, start)
    np.testing.assert_array_equal(result.keep, keep)


def test_closed_form_objective_is_the_real_reconstruction_error() -> None:
    rng = np.random.default_rng(11)
    x = correlated_inputs(rng, 24, rows=200)  # (rows, K)
    w = rng.standard_normal((5, 24))
    w_hat = np.where(rng.random((5, 24)) < 0.5, 0.0, rng.standard_normal((5, 24)))
    direct = float(np.sum(((w - w_hat) @ x.T) ** 2))
    assert layer_objective(w, w_hat, x.T @ x, percdamp=0.0) == pytest.approx(direct, rel=1e-10)


def test_closed_form_with_dense_targets_differs_from_the_real_error_by_a_constant() -> None:
    """‖W X_d - Ŵ X_p‖² = objective + const: differences between two candidate weights agree exactly."""
    rng = np.random.default_rng(12)
    x_dense = correlated_inputs(rng, 24, rows=300)
    x_pruned = x_dense + 0.3 * rng.standard_normal(x_dense.shape) * x_dense.std(axis=0)
    h, cross = x_pruned.T @ x_pruned, x_dense.T @ x_pruned
    w = rng.standard_normal((5, 24))
    a, b = (np.where(rng.random((5, 24)) < 0.5, 0.0, rng.standard_normal((5, 24))) for _ in range(2))

    def direct(w_hat: np.ndarray) -> float:
        return float(np.sum((w @ x_dense.T - w_hat @ x_pruned.T) ** 2))

    ours = layer_objective(w, a, h, 0.0, cross) - layer_objective(w, b, h, 0.0, cross)
    assert ours == pytest.approx(direct(a) - direct(b), rel=1e-8)


def test_an_input_scope_is_refused() -> None:
    w = np.ones((4, 8))
    with pytest.raises(ValueError, match="per input channel"):
        swap_refine(w, w, np.eye(8), Unstructured(0.5, Scope.INPUT), budget=1)


def test_apply_with_swaps_brings_the_model_closer_to_the_dense_one_in_onnx_runtime() -> None:
    """Through the pruning pass: SparseGPT 2:4 with swaps, the output error on the calibration rows (ONNX Runtime
    before and after) is lower than without; the stored weight stays 2:4 along K."""
    import onnx_ir as ir
    from onnx import helper

    from graphprune.algorithms.scores import Method
    from graphprune.calibration.stats import ActivationStats
    from graphprune.graph.targets import find_targets
    from graphprune.passes.prune import PruneConfig, PrunePass
    from tests.onnx_builders import init, initializer, make_model, run, tensor

    rng = np.random.default_rng(4)
    x = correlated_inputs(rng, 32, rows=256).astype(np.float32)
    w = rng.standard_normal((32, 12)).astype(np.float32)  # MatMul B: [K, N]
    proto = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [tensor("x", shape=["n", 32])],
        [tensor("y")],
        [init(w, "w")],
    )
    dense_out = run(proto, {"x": x})[0].astype(np.float64)
    errors = []
    for swaps in (0, 16):
        model = ir.from_proto(proto)
        targets = find_targets(model, include_head=True).targets
        x64 = x.astype(np.float64)
        stats = ActivationStats.from_sumsq({"w": (x64**2).sum(axis=0)}, targets, {"w": x64.T @ x64})
        config = PruneConfig(NMPattern(2, 4), method=Method.SPARSEGPT, include_head=True, swaps=swaps)
        PrunePass(config=config, stats=stats)(model)
        assert not nm_violations(initializer(model, "w").T, NMPattern(2, 4)).any()
        errors.append(float(np.sum((run(model, {"x": x})[0] - dense_out) ** 2)))
    assert errors[1] < errors[0]
