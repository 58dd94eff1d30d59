"""Dense-target reconstruction against independent references: the usual solvers when nothing upstream is pruned,
numpy least squares on explicit activations, and the dense model's own outputs."""

from __future__ import annotations

import numpy as np
import pytest

from graphprune.algorithms.alps import alps_solve
from graphprune.algorithms.dense_target import blended_cross, dense_target_weight
from graphprune.algorithms.pattern import NMPattern, Pattern, Unstructured
from graphprune.algorithms.scores import Method
from graphprune.algorithms.sparsegpt import sparsegpt_with_mask
from graphprune.errors import GraphpruneError
from graphprune.passes.prune import PruneConfig

PATTERNS = [NMPattern(2, 4), Unstructured(0.5)]


def inputs(rng: np.random.Generator, k: int, rows: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Dense-model rows and the pruned model's rows of the same windows (the dense ones, perturbed)."""
    cov = 0.7 ** np.abs(np.subtract.outer(np.arange(k), np.arange(k)))
    x_dense = (rng.standard_normal((rows, k)) @ np.linalg.cholesky(cov).T) * rng.gamma(2.0, 1.0, size=k)
    x_pruned = x_dense * (1 + 0.2 * rng.standard_normal(k)) + 0.3 * rng.standard_normal((rows, k)) * x_dense.std(0)
    return x_dense, x_pruned


def solve(solver: str, w: np.ndarray, h: np.ndarray, pattern: Pattern, cross: np.ndarray | None) -> tuple:
    if solver == "sparsegpt":
        return sparsegpt_with_mask(w, h, pattern, cross=cross)
    result = alps_solve(w, h, pattern, cross=cross)
    return result.weight, result.keep


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("solver", ["sparsegpt", "alps"])
def test_nothing_pruned_upstream_gives_the_usual_solution(solver: str, pattern: Pattern) -> None:
    """C = H (the dense and pruned inputs are the same), or a blend of 0: the solver's output of today, to 1e-6.
    A blend of 1 is today's dense target, bit for bit; a half blend is neither."""
    for seed in range(3):
        rng = np.random.default_rng(seed)
        x_dense, x_pruned = inputs(rng, 64)
        h, cross = x_pruned.T @ x_pruned, x_dense.T @ x_pruned
        w = rng.standard_normal((12, 64)).astype(np.float32)
        usual, usual_keep = solve(solver, w, h, pattern, None)
        for same in (h.copy(), blended_cross(cross, h, 0.0)):
            aimed, aimed_keep = solve(solver, w, h, pattern, same)
            np.testing.assert_array_equal(aimed_keep, usual_keep)
            np.testing.assert_allclose(aimed, usual, atol=1e-6, rtol=0)
            assert aimed.dtype == usual.dtype == w.dtype
        dense = solve(solver, w, h, pattern, cross)[0]
        np.testing.assert_array_equal(solve(solver, w, h, pattern, blended_cross(cross, h, 1.0))[0], dense)
        half = solve(solver, w, h, pattern, blended_cross(cross, h, 0.5))[0]
        assert not np.allclose(half, usual) and not np.allclose(half, dense)


@pytest.mark.parametrize("percdamp", [0.0, 0.05])
def test_the_dense_target_weight_is_the_damped_least_squares_fit(percdamp: float) -> None:
    """W' = argmin ‖W X_d - W' X_p‖² + λ‖W - W'‖², solved by numpy's lstsq on the stacked explicit system."""
    rng = np.random.default_rng(5)
    x_dense, x_pruned = inputs(rng, 20, rows=150)
    w = rng.standard_normal((4, 20))
    h, cross = x_pruned.T @ x_pruned, x_dense.T @ x_pruned
    damping = percdamp * float(np.mean(np.diag(h)))
    a = np.vstack([x_pruned, np.sqrt(damping) * np.eye(20)])  # rows: (samples + K, K)
    b = np.vstack([x_dense @ w.T, np.sqrt(damping) * w.T])
    reference = np.linalg.lstsq(a, b, rcond=None)[0].T
    np.testing.assert_allclose(dense_target_weight(w, h, cross, percdamp), reference, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("solver", ["sparsegpt", "alps"])
def test_aiming_at_the_dense_outputs_reconstructs_them_better(solver: str, pattern: Pattern) -> None:
    """‖W X_d - Ŵ X_p‖ on explicit activations, summed over seeds: lower with the cross-Gram than without."""
    aimed_error = usual_error = 0.0
    for seed in range(4):
        rng = np.random.default_rng(seed)
        x_dense, x_pruned = inputs(rng, 48)
        h, cross = x_pruned.T @ x_pruned, x_dense.T @ x_pruned
        w = rng.standard_normal((10, 48))
        dense_out = w @ x_dense.T
        usual, _ = solve(solver, w, h, pattern, None)
        aimed, _ = solve(solver, w, h, pattern, cross)
        usual_error += float(np.sum((dense_out - usual @ x_pruned.T) ** 2))
        aimed_error += float(np.sum((dense_out - aimed @ x_pruned.T) ** 2))
    assert aimed_error < 0.9 * usual_error


def test_a_dead_pruned_input_gets_no_weight() -> None:
    """An input the pruned prefix never fires cannot carry the dense model's share: its weights stay zero."""
    rng = np.random.default_rng(2)
    x_dense, x_pruned = inputs(rng, 16)
    x_pruned[:, 3] = 0.0
    h, cross = x_pruned.T @ x_pruned, x_dense.T @ x_pruned
    w = rng.standard_normal((6, 16))
    for solver in ("sparsegpt", "alps"):
        aimed, _ = solve(solver, w, h, NMPattern(2, 4), cross)
        assert not aimed[:, 3].any()


def stacked(x_dense: np.ndarray, x_pruned: np.ndarray, w: np.ndarray, blend: float, damping: float) -> tuple:
    """The explicit least-squares system of the blended objective: rows √a X_p → √a X_d Wᵀ, √(1-a) X_p →
    √(1-a) X_p Wᵀ and the damping rows √λ I → √λ Wᵀ."""
    k = w.shape[1]
    a = np.vstack([np.sqrt(blend) * x_pruned, np.sqrt(1 - blend) * x_pruned, np.sqrt(damping) * np.eye(k)])
    b = np.vstack([np.sqrt(blend) * x_dense @ w.T, np.sqrt(1 - blend) * x_pruned @ w.T, np.sqrt(damping) * w.T])
    return a, b


@pytest.mark.parametrize("blend", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("percdamp", [0.0, 0.05])
def test_the_blended_target_weight_is_the_least_squares_fit_of_the_blended_objective(
    blend: float, percdamp: float
) -> None:
    """W' = argmin a‖W X_d - W' X_p‖² + (1 - a)‖W X_p - W' X_p‖² + λ‖W - W'‖², against numpy's lstsq."""
    rng = np.random.default_rng(11)
    x_dense, x_pruned = inputs(rng, 20, rows=150)
    w = rng.standard_normal((5, 20))
    h, cross = x_pruned.T @ x_pruned, x_dense.T @ x_pruned
    damping = percdamp * float(np.mean(np.diag(h)))
    reference = np.linalg.lstsq(*stacked(x_dense, x_pruned, w, blend, damping), rcond=None)[0].T
    got = dense_target_weight(w, h, blended_cross(cross, h, blend), percdamp)
    np.testing.assert_allclose(got, reference, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_alps_keeps_the_least_squares_weights_of_the_blended_objective_on_its_mask(pattern: Pattern) -> None:
    """ALPS refits exactly on its final support: each row's kept weights are lstsq on the kept columns only."""
    rng = np.random.default_rng(3)
    x_dense, x_pruned = inputs(rng, 32)
    w = rng.standard_normal((6, 32))
    h, cross = x_pruned.T @ x_pruned, x_dense.T @ x_pruned
    percdamp, blend = 0.01, 0.4
    result = alps_solve(w, h, pattern, percdamp=percdamp, cross=blended_cross(cross, h, blend))
    a, b = stacked(x_dense, x_pruned, w, blend, percdamp * float(np.mean(np.diag(h))))
    for row in range(w.shape[0]):
        kept = result.keep[row]
        reference = np.linalg.lstsq(a[:, kept], b[:, row], rcond=None)[0]
        np.testing.assert_allclose(result.weight[row, kept], reference, rtol=1e-6, atol=1e-8)
        assert not result.weight[row, ~kept].any()


def test_a_blend_outside_zero_to_one_is_refused() -> None:
    h = np.eye(4)
    for blend in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            blended_cross(h, h, blend)
    for config in (
        {"target": "dense", "target_blend": 1.5},
        {"target": "dense", "target_blend": float("nan")},
        {"target": "pruned", "target_blend": 0.5},
    ):
        with pytest.raises(GraphpruneError, match="target_blend"):
            PruneConfig(NMPattern(2, 4), method=Method.ALPS, **config)  # type: ignore[arg-type]
