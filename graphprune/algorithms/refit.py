"""Least-squares refit of a consumer after some of its input channels are removed (structured OBS).

Pure numpy. A consumer computes ``y = W x + b`` with ``W`` ``(out, K)``; structured pruning removes the input
channels R and keeps S. The refit chooses the kept weights and the bias that best reproduce the dense output on
the calibration inputs:

    min over Ŵ_S, b̂ of  E‖W x + b - Ŵ_S x_S - b̂‖²  +  λ‖Ŵ_S - W_S‖²

from the input's second moments alone: ``G = E[x xᵀ]`` and ``μ = E[x]``. On the augmented input ``x̃ = [x_S; 1]``
(whose ones row carries the bias) the normal equations give the change of the kept weights and of the bias in
closed form:

    [ΔW_S, Δb] = W_R · [G_RS, μ_R] · A⁻¹,   A = [[G_SS + λI, μ_S], [μ_Sᵀ, 1]]

(SlimGPT's and ZipLM's structured OBS step, solved at once for the removed set rather than column block by
block). With ``λ = 0`` this is exactly the least-squares fit of the dense output on the kept inputs and a constant.

Choices, on purpose:

* The damping pulls the *change* towards zero (a ridge around W_S), not the weights: ``λ = percdamp · mean(diag
  G)`` as SparseGPT damps, added to the kept channels only (the bias is the one unknown every token informs).
  So removing channels whose weights are zero changes nothing whatever λ is, and a channel the data never saw
  (``G_jj = 0``) keeps its weight.
* FLAP's compensation is the special case that may change only the bias: ``Δb = W_R μ_R`` (:func:`flap_bias` in
  :mod:`.structured`); the refit minimises the same objective over a superset, so it never does worse on the
  calibration data.
* If the damped system is singular (statistics from float32 sums, λ = 0), λ grows tenfold, up to five times,
  before giving up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SINGULAR = "the damped Gram matrix of the kept channels is singular"


@dataclass(frozen=True)
class Refit:
    """The kept weights ``(out, |S|)`` after the refit and the change of the bias ``(out,)`` (zero without one)."""

    weight: np.ndarray
    bias_delta: np.ndarray
    damping: float  # the λ used


def moments_from_sums(gram_sum: np.ndarray, sums: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """``E[x xᵀ]`` and ``E[x]`` from ``Σ x xᵀ``, ``Σ x`` and the number of rows."""
    if rows <= 0:
        raise ValueError("no calibration rows were seen")
    return np.asarray(gram_sum, np.float64) / rows, np.asarray(sums, np.float64) / rows


def refit(
    weight: np.ndarray,
    gram: np.ndarray,
    mean: np.ndarray | None,
    kept: np.ndarray,
    percdamp: float = 0.01,
) -> Refit:
    """Refit ``weight`` ``(out, K)`` on the ``kept`` input channels; with ``mean`` the bias is refitted too.

    ``gram`` is ``E[x xᵀ]`` ``(K, K)`` and ``mean`` ``E[x]`` ``(K,)`` of the consumer's input over the
    calibration rows (both on the same scale: divided by the same row count). Without ``mean`` the bias stays
    as it is and ``bias_delta`` is zero.
    """
    w = np.asarray(weight, dtype=np.float64)
    g = np.asarray(gram, dtype=np.float64)
    k = w.shape[1]
    if g.shape != (k, k):
        raise ValueError(f"Gram matrix of shape {g.shape} for a weight with K = {k}")
    kept = np.asarray(kept, dtype=np.int64)
    removed = np.setdiff1d(np.arange(k), kept)
    if kept.size == 0:
        raise ValueError("nothing is kept")
    cross = g[np.ix_(removed, kept)]  # G_RS
    system = g[np.ix_(kept, kept)]
    if mean is not None:
        mu = np.asarray(mean, dtype=np.float64)
        cross = np.concatenate([cross, mu[removed, None]], axis=1)
        system = np.block([[system, mu[kept, None]], [mu[None, kept], np.ones((1, 1))]])
    rhs = w[:, removed] @ cross  # (out, |S| [+1])
    damp = np.zeros(system.shape[0])
    damp[: kept.size] = 1.0  # the ones row of the bias is not damped
    delta, lam = _solve_damped(system, damp, percdamp * float(np.mean(np.diag(g))), rhs.T)
    delta = delta.T  # A is symmetric: X A = R  ⇔  A Xᵀ = Rᵀ
    weight_kept = w[:, kept] + delta[:, : kept.size]
    bias_delta = delta[:, kept.size] if mean is not None else np.zeros(w.shape[0])
    return Refit(weight_kept, bias_delta, lam)


def _solve_damped(matrix: np.ndarray, where: np.ndarray, base: float, rhs: np.ndarray) -> tuple[np.ndarray, float]:
    """``(matrix + λ·diag(where))⁻¹ rhs`` with ``λ = base``, else ten times more, up to five times, while the
    system is singular or the solution not finite (a zero ``base`` that fails starts again from 1e-8 of the mean
    diagonal). One LU solve per try: with λ > 0 the damped Gram matrix is positive definite in exact arithmetic,
    and a separate Cholesky check cost four times the solve."""
    base = max(base, 0.0)
    for attempt in range(6):
        lam = base * 10.0**attempt
        try:
            solution = np.linalg.solve(matrix + np.diag(where * lam), rhs)
            if np.isfinite(solution).all():
                return solution, lam
        except np.linalg.LinAlgError:
            pass
        if base == 0.0:
            base = 1e-8 * max(float(np.mean(np.abs(np.diag(matrix)))), 1e-30)
    raise np.linalg.LinAlgError(SINGULAR)


def output_error(
    weight: np.ndarray,
    gram: np.ndarray,
    mean: np.ndarray,
    kept: np.ndarray,
    weight_kept: np.ndarray,
    bias_delta: np.ndarray,
) -> float:
    """``E‖W x + b - Ŵ_S x_S - b̂‖²`` summed over the outputs, from the moments alone (the refit's objective)."""
    w = np.asarray(weight, dtype=np.float64)
    diff = w.copy()
    diff[:, kept] -= weight_kept
    # E‖D x - Δb‖² = tr(D G Dᵀ) - 2 Δbᵀ D μ + ‖Δb‖²
    dg = diff @ np.asarray(gram, np.float64)
    quad = float(np.einsum("ij,ij->", dg, diff))
    return quad - 2.0 * float(bias_delta @ (diff @ np.asarray(mean, np.float64))) + float(bias_delta @ bias_delta)


def removal_costs(
    weight: np.ndarray, gram: np.ndarray, mean: np.ndarray, unit_size: int, percdamp: float = 0.01
) -> np.ndarray:
    """The output error the refit leaves when each unit (``unit_size`` consecutive input channels) goes alone.

    The structured OBS saliency (ZipLM, SlimGPT): with the bias refitted too, the inverse of the augmented Gram
    matrix restricted to the channels is the inverse covariance ``Σ⁻¹``, ``Σ = G - μμᵀ`` (a Schur complement), so
    removing the channels U costs ``tr(W_U [(Σ⁻¹)_UU]⁻¹ W_Uᵀ)``. Uncorrelated channels make ``Σ`` diagonal and
    this FLAP's ``Var(x_j)·‖W_:,j‖²``; correlated ones are cheaper to remove, since the others stand in for them.
    Damped as :func:`refit` damps (``λ`` on the diagonal of ``Σ``).
    """
    w = np.asarray(weight, dtype=np.float64)
    g = np.asarray(gram, dtype=np.float64)
    mu = np.asarray(mean, dtype=np.float64)
    k = w.shape[1]
    if k % unit_size:
        raise ValueError(f"{k} channels do not split into units of {unit_size}")
    inverse, _ = _solve_damped(g - np.outer(mu, mu), np.ones(k), percdamp * float(np.mean(np.diag(g))), np.eye(k))
    units = k // unit_size
    costs = np.empty(units)
    for u in range(units):
        cols = slice(u * unit_size, (u + 1) * unit_size)
        block = inverse[cols, cols]
        wu = w[:, cols]
        costs[u] = float(np.einsum("ij,ij->", wu, np.linalg.solve(block, wu.T).T))
    return costs
