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
* Dense targets (``target``): after upstream layers were shrunk, the consumer's input is ``x_s`` (the shrunk
  prefix's) while the dense model computed ``W x_d + b``. Fitting ``Ŵ_S x_s + b̂`` to the dense output needs
  the cross moments ``C = E[x_d x_sᵀ]`` and ``μ_d = E[x_d]``: the right-hand side becomes
  ``[W C_:S - W_S G_SS, W μ_d - W_S μ_S]``, which with ``x_d = x_s`` is the one above (``W_R [G_RS, μ_R]``).
  The damping still pulls towards ``W_S``. A blend of the two targets is the same problem with
  ``a C + (1 - a) G`` and ``a μ_d + (1 - a) μ`` (:func:`graphprune.algorithms.dense_target.blended_cross`).
* If the damped system is singular (statistics from float32 sums, λ = 0), λ grows tenfold, up to five times,
  before giving up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from graphprune.algorithms.structured import channels_of_units

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
    target: tuple[np.ndarray, np.ndarray | None] | None = None,
) -> Refit:
    """Refit ``weight`` ``(out, K)`` on the ``kept`` input channels; with ``mean`` the bias is refitted too.

    ``gram`` is ``E[x xᵀ]`` ``(K, K)`` and ``mean`` ``E[x]`` ``(K,)`` of the consumer's input over the
    calibration rows (both on the same scale: divided by the same row count). Without ``mean`` the bias stays
    as it is and ``bias_delta`` is zero. ``target`` ``(C, μ_d)``: fit the dense model's output instead, from the
    cross moments ``C = E[x_d xᵀ]`` ``(K, K)`` (row: dense channel) and the dense input's mean ``μ_d`` (needed
    with ``mean``).
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
    if target is not None:
        rhs = _dense_rhs(w, g, mean, kept, *target)
    damp = np.zeros(system.shape[0])
    damp[: kept.size] = 1.0  # the ones row of the bias is not damped
    delta, lam = _solve_damped(system, damp, percdamp * float(np.mean(np.diag(g))), rhs.T)
    delta = delta.T  # A is symmetric: X A = R  ⇔  A Xᵀ = Rᵀ
    weight_kept = w[:, kept] + delta[:, : kept.size]
    bias_delta = delta[:, kept.size] if mean is not None else np.zeros(w.shape[0])
    return Refit(weight_kept, bias_delta, lam)


def _dense_rhs(
    w: np.ndarray,
    g: np.ndarray,
    mean: np.ndarray | None,
    kept: np.ndarray,
    cross: np.ndarray,
    dense_mean: np.ndarray | None,
) -> np.ndarray:
    """``[W C_:S - W_S G_SS, W μ_d - W_S μ_S]``: the right-hand side when the target is the dense output."""
    c = np.asarray(cross, dtype=np.float64)
    if c.shape != g.shape:
        raise ValueError(f"cross moments of shape {c.shape} for a Gram matrix of shape {g.shape}")
    rhs = w @ c[:, kept] - w[:, kept] @ g[np.ix_(kept, kept)]
    if mean is None:
        return rhs
    if dense_mean is None:
        raise ValueError("a refitted bias towards the dense output needs the dense input's mean")
    bias = w @ np.asarray(dense_mean, np.float64) - w[:, kept] @ np.asarray(mean, np.float64)[kept]
    return np.concatenate([rhs, bias[:, None]], axis=1)


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
    k = w.shape[1]
    if k % unit_size:
        raise ValueError(f"{k} channels do not split into units of {unit_size}")
    return _unit_costs(w, _inverse_covariance(gram, mean, percdamp), unit_size)


def _inverse_covariance(gram: np.ndarray, mean: np.ndarray, percdamp: float) -> np.ndarray:
    """``Σ⁻¹``, ``Σ = G - μμᵀ``, damped as :func:`refit` damps (``λ`` on the diagonal of ``Σ``), float64."""
    g, mu = np.asarray(gram, np.float64), np.asarray(mean, np.float64)
    k = g.shape[0]
    inverse, _ = _solve_damped(g - np.outer(mu, mu), np.ones(k), percdamp * float(np.mean(np.diag(g))), np.eye(k))
    return inverse


def greedy_costs(
    consumers: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    unit_size: Sequence[int],
    percdamp: float = 0.01,
    steps: int | None = None,
) -> np.ndarray:
    """Structured OBS one unit at a time (ZipLM's and SlimGPT's greedy walk): scores whose ascending order is the
    order in which the walk removes units.

    ``consumers``: ``(W (out, K), G, μ)`` of every consumer the units feed (``unit_size[c]`` channels per unit
    in consumer c). Each step removes the unit whose removal, with the kept weights and bias refitted, adds the
    least output error *given the units already gone* (summed over the consumers), then applies that unit's OBS
    update to the weights and the inverse covariance. One-shot costs (:func:`removal_costs`) price every unit
    against the full set, so two correlated units both look cheap although each stands in for the other; the
    walk sees that once the first has gone. ``steps`` bounds the walk (default: all but one unit); each removed
    unit scores the largest step cost so far (a running maximum, so lowest-first selection follows the walk),
    units never reached score above every removed one, by their costs at the end of the walk.
    """
    units = consumers[0][0].shape[1] // unit_size[0]
    state = [
        _Walker(w, g, mu, size, units, percdamp) for (w, g, mu), size in zip(consumers, unit_size, strict=True)
    ]
    work = np.arange(units)  # the working units' original indices
    live = np.ones(units, dtype=bool)  # per working unit
    scores = np.empty(units)
    level = -np.inf
    for _ in range(units - 1 if steps is None else min(steps, units - 1)):
        costs = np.sum([c.costs() for c in state], axis=0)
        costs[~live] = np.inf
        j = int(np.argmin(costs))
        level = max(np.nextafter(level, np.inf), float(costs[j]))  # strictly increasing along the walk
        scores[work[j]], live[j] = level, False
        for c in state:
            c.remove(j)
        if 8 * np.count_nonzero(~live) >= live.size:  # compact: later steps cost what the units left cost
            keep = np.flatnonzero(live)
            for c in state:
                c.keep(keep)
            work, live = work[keep], np.ones(keep.size, dtype=bool)
    if live.any():  # never reached: above every removed unit, in the order of their costs at the end
        rest = np.sum([c.costs() for c in state], axis=0)
        scores[work[live]] = np.maximum(rest[live], np.nextafter(level, np.inf))
    return scores


class _Walker:
    """One consumer's weights ``W`` and damped inverse covariance ``H⁻¹`` over the working channels, as the walk
    removes units from them.

    Removing unit U is the OBS update ``W -= W_:U R``, ``H⁻¹ -= H⁻¹_:U R`` with ``R = [H⁻¹_UU]⁻¹ H⁻¹_U:``. For
    single channels (MLP neurons, filters) the updates are kept as factors and applied in blocks (as GPTQ's lazy
    batches): a step needs only column j of ``W``, row j of ``H⁻¹``, ``diag H⁻¹`` and the columns' squared norms,
    each brought up to date in O(K x pending) instead of rewriting the K x K inverse at every step.
    """

    BLOCK = 32  # pending single-channel updates before they are applied

    def __init__(self, weight: np.ndarray, gram: np.ndarray, mean: np.ndarray, size: int, units: int, damp: float):
        self.w = np.array(weight, dtype=np.float64)
        if self.w.shape[1] != units * size:
            raise ValueError(f"{self.w.shape[1]} channels do not split into {units} units of {size}")
        self.h = _inverse_covariance(gram, mean, damp)
        self.size = size
        self.pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (W_:j, H⁻¹_j:, R) per removal
        self._refresh()

    def _refresh(self) -> None:
        self.diag, self.norms = np.diag(self.h).copy(), np.einsum("ij,ij->j", self.w, self.w)

    def costs(self) -> np.ndarray:
        """``tr(W_U [H⁻¹_UU]⁻¹ W_Uᵀ)`` per working unit (inf where the unit is gone)."""
        if self.size > 1:
            return _unit_costs(self.w, self.h, self.size)
        gone = self.diag <= 0
        return np.where(gone, np.inf, self.norms / np.where(gone, 1.0, self.diag))

    def remove(self, j: int) -> None:
        if self.size > 1:
            cols = slice(j * self.size, (j + 1) * self.size)
            row = np.linalg.pinv(self.h[cols, cols]) @ self.h[cols, :]
            self.w -= self.w[:, cols] @ row  # the unit's columns become zero, the others compensate
            self.h -= self.h[:, cols] @ row
            self.w[:, cols], self.h[cols, :], self.h[:, cols] = 0.0, 0.0, 0.0
            return
        a, hrow = self.w[:, j].copy(), self.h[j, :].copy()
        aw = a @ self.w
        if self.pending:  # column j of W, row j of H⁻¹ and aᵀW as they are with the pending updates
            a_cols, h_rows, r_rows = (np.stack(parts) for parts in zip(*self.pending, strict=True))
            a -= r_rows[:, j] @ a_cols
            hrow -= h_rows[:, j] @ r_rows
            aw = a @ self.w - (a_cols @ a) @ r_rows
        row = hrow / hrow[j]
        self.norms += row * (row * float(a @ a) - 2.0 * aw)  # ‖W_:i - a r_i‖²
        self.diag -= hrow * row  # H⁻¹ is symmetric: column j is row j
        self.norms[j], self.diag[j] = 0.0, 0.0
        self.pending.append((a, hrow, row))
        if len(self.pending) >= self.BLOCK:
            self._apply()

    def _apply(self) -> None:
        if self.pending:
            a_cols, h_rows, r_rows = (np.stack(parts) for parts in zip(*self.pending, strict=True))
            self.w -= a_cols.T @ r_rows
            self.h -= h_rows.T @ r_rows
            self.pending = []
            self._refresh()

    def keep(self, units: np.ndarray) -> None:
        """Only the given working units stay (the others are gone)."""
        self._apply()
        cols = channels_of_units(units, self.size)
        self.w, self.h = self.w[:, cols], self.h[np.ix_(cols, cols)]
        self._refresh()


def _unit_costs(w: np.ndarray, inverse: np.ndarray, size: int) -> np.ndarray:
    """``tr(W_U [H⁻¹_UU]⁻¹ W_Uᵀ)`` per unit U of ``size`` channels (a removed unit, its block all zero: inf)."""
    units = w.shape[1] // size
    out = np.empty(units)
    for u in range(units):
        cols = slice(u * size, (u + 1) * size)
        block = inverse[cols, cols]
        if not np.any(block):
            out[u] = np.inf
            continue
        wu = w[:, cols]
        out[u] = float(np.einsum("ij,ij->", wu, np.linalg.solve(block, wu.T).T))
    return out
