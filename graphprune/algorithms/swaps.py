"""Mask refinement by swaps (after SparseSwaps, 2025): exchange a kept and a pruned weight while the error falls.

A solver (SparseGPT, ALPS) leaves a weight ``Ŵ`` on a support (the keep-mask). The layer objective, in the
canonical ``(out, K)`` layout, is the solver's own::

    f(Ŵ) = tr((W' - Ŵ) H (W' - Ŵ)ᵀ) = Σ_rows δ H δᵀ,   δ = W' - Ŵ (a row's residual)

with ``H`` the damped Gram matrix and ``W' = W`` (or the dense-target weight, :mod:`.dense_target`). Rows are
independent, so every step below runs on all rows at once.

A swap in a row prunes a kept position p and keeps a pruned position u, inside one group of M for N:M (so every
group keeps its count) or anywhere in the row for unstructured patterns (so every row keeps its count). With
``g = δ H`` (kept up to date), setting ``ŵ_p = 0`` and ``ŵ_u = v`` changes the row's objective by exactly::

    Δ(p, u, v) = 2 ŵ_p g_p + ŵ_p² H_pp - 2 v (g_u + ŵ_p H_pu) + v² H_uu

smallest at ``v = (g_u + ŵ_p H_pu) / H_uu``:  ``Δ(p, u) = 2 ŵ_p g_p + ŵ_p² H_pp - (g_u + ŵ_p H_pu)² / H_uu``.

Steps:

1. each row still improving takes its best swap (the most negative Δ) when that lowers its objective by more
   than a relative ``1e-9``; ``δ`` and ``g`` change by two rank-1 terms (``g += ŵ_p H_p - v H_u``), O(K) a row;
2. repeated until no row improves or each row made ``budget`` swaps;
3. the kept weights of the rows that swapped are re-solved on their new support (conjugate gradients from the
   current point, batched over rows: each step lowers the objective); a row whose objective the re-solve did not
   lower keeps its swapped weights;
4. those rows, while they have swaps left, steps 1-3 again (after a re-solve ``g`` vanishes on the support, so new
   swaps can appear); at most ``MAX_ROUNDS`` rounds. Rows that found no swap are done, and cost nothing more.

N:M rows evaluate every (kept, pruned) pair of every group. Unstructured rows evaluate the pairs among the
``CANDIDATES`` cheapest removals and the ``CANDIDATES`` best single additions (both exact terms of Δ), each pair
exactly. Every accepted swap lowers the exact objective, and the re-solve never raises it: the result is never
worse than the solver's. Deviation from SparseSwaps: it keeps the weights' values fixed (a mask problem); here the
swapped-in weight takes its best value and the kept weights are re-solved, as the layer's solver would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from graphprune.algorithms.dense_target import reconstruction_problem
from graphprune.algorithms.pattern import NMPattern, Pattern, Scope, Unstructured

CANDIDATES = 16  # unstructured: removals and additions considered per row and step
REFIT_STEPS = 10  # conjugate-gradient steps of each re-solve
MAX_ROUNDS = 4  # swap-then-re-solve rounds
RELATIVE_GAIN = 1e-9  # a swap must lower its row's objective by more than this fraction
_CHUNK_ELEMENTS = 1 << 21  # pair scores evaluated at a time (float64)


@dataclass(kw_only=True)
class SwapResult:
    """The refined weight (in the input's dtype), its keep-mask, and what the refinement did."""

    weight: np.ndarray
    keep: np.ndarray
    swaps: int  # accepted swaps over all rows
    objective_before: float
    objective_after: float


def layer_objective(
    weight: np.ndarray,
    weight_hat: np.ndarray,
    gram: np.ndarray,
    percdamp: float = 0.0,
    cross: np.ndarray | None = None,
) -> float:
    """``tr((W' - Ŵ)(H + λI)(W' - Ŵ)ᵀ)``: with ``percdamp=0`` and no ``cross``, ``‖(W - Ŵ) Xᵀ‖²`` for ``H = XᵀX``;
    with ``cross``, ``‖W X_dᵀ - Ŵ X_pᵀ‖²`` less a constant that does not depend on ``Ŵ``."""
    target, h = reconstruction_problem(weight, gram, percdamp, cross)
    delta = target - np.asarray(weight_hat, dtype=np.float64)
    return float(np.einsum("ij,ij->", delta @ h, delta))


def swap_refine(
    weight: np.ndarray,
    weight_hat: np.ndarray,
    gram: np.ndarray,
    pattern: Pattern,
    budget: int,
    percdamp: float = 0.01,
    cross: np.ndarray | None = None,
    keep: np.ndarray | None = None,
) -> SwapResult:
    """Refine the solver's ``weight_hat`` (from the dense ``weight``, both ``(out, K)``) by at most ``budget``
    swaps per row (see the module docstring). ``keep`` is the solver's mask (default: ``weight_hat``'s non-zeros);
    ``gram``, ``percdamp`` and ``cross`` are the solver's own, so the objective is the one it minimised."""
    _check(weight, weight_hat, gram, pattern, budget)
    keep = np.array(weight_hat != 0 if keep is None else keep, dtype=bool, copy=True)
    target, h = reconstruction_problem(weight, gram, percdamp, cross)
    w = np.where(keep, np.asarray(weight_hat, dtype=np.float64), 0.0)
    state = _Rows(w, keep, target, h, pattern)
    before = float(state.objective.sum())
    left = np.full(w.shape[0], budget, dtype=np.int64)
    rows = np.flatnonzero(left)
    for _ in range(MAX_ROUNDS):
        rows = state.swap(rows, left)  # the rows that changed: only they can find new swaps after a re-solve
        if not rows.size:
            break
        state.refit(rows)
    swaps = int((budget - left).sum())
    return SwapResult(
        weight=state.w.astype(weight_hat.dtype),
        keep=state.keep,
        swaps=swaps,
        objective_before=before,
        objective_after=float(state.objective.sum()),
    )


class _Rows:
    """The rows' weights, masks, residual gradients ``g = (W' - Ŵ) H`` and objectives, updated in place."""

    def __init__(
        self, w: np.ndarray, keep: np.ndarray, target: np.ndarray, h: np.ndarray, pattern: Pattern
    ) -> None:
        self.w, self.keep, self.target, self.h, self.pattern = w, keep, target, h, pattern
        self.hd = np.diag(h).copy()
        delta = target - w
        self.g = delta @ h
        self.objective = np.einsum("ij,ij->i", delta, self.g)
        if isinstance(pattern, NMPattern):
            m, groups = pattern.group, h.shape[0] // pattern.group
            g = np.arange(groups)
            self.blocks = h.reshape(groups, m, groups, m)[g, :, g, :]  # (G, M, M): H within each group

    def swap(self, rows: np.ndarray, left: np.ndarray) -> np.ndarray:
        """Steps 1-2 of the module docstring on ``rows``; ``left`` (swaps left per row) is spent in place.
        Returns the rows that swapped."""
        active = rows[left[rows] > 0]
        changed = np.zeros(left.shape, dtype=bool)
        while active.size:
            gain, p, u, v = self._best(active)
            better = gain < -RELATIVE_GAIN * self.objective[active]
            rows, p, u, v, gain = active[better], p[better], u[better], v[better], gain[better]
            if not rows.size:
                break
            wp = self.w[rows, p]
            self.g[rows] += wp[:, None] * self.h[p] - v[:, None] * self.h[u]
            self.objective[rows] += gain
            self.w[rows, p], self.w[rows, u] = 0.0, v
            self.keep[rows, p], self.keep[rows, u] = False, True
            left[rows] -= 1
            changed[rows] = True
            active = rows[left[rows] > 0]
        return np.flatnonzero(changed)

    def _best(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per row: the best swap's Δ, the position pruned, the position kept, and its new value."""
        k = self.w.shape[1]
        per_row = k * (self.pattern.group if isinstance(self.pattern, NMPattern) else CANDIDATES)
        step = max(1, _CHUNK_ELEMENTS // per_row)
        parts = [self._best_chunk(rows[i : i + step]) for i in range(0, rows.size, step)]
        return tuple(np.concatenate(x) for x in zip(*parts, strict=True))  # type: ignore[return-value]  # tuple() of 4: _best_chunk's arrays

    def _best_chunk(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        w, g, keep = self.w[rows], self.g[rows], self.keep[rows]
        removal = 2.0 * w * g + w * w * self.hd  # Δ of pruning p alone
        if isinstance(self.pattern, NMPattern):
            return self._best_in_groups(w, g, keep, removal)
        return self._best_in_rows(w, g, keep, removal)

    def _best_in_groups(
        self, w: np.ndarray, g: np.ndarray, keep: np.ndarray, removal: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        n, k = w.shape
        m = self.blocks.shape[1]
        shape = (n, k // m, m)
        wg, gg, kg = w.reshape(shape), g.reshape(shape), keep.reshape(shape)
        hd = self.hd.reshape(shape[1:])
        # [row, group, p, u]: the gradient at u once p is pruned, and the pair's Δ
        after = gg[:, :, None, :] + wg[:, :, :, None] * self.blocks[None]
        delta = removal.reshape(shape)[..., None] - after * after / hd[None, :, None, :]
        delta[~(kg[..., :, None] & ~kg[..., None, :])] = np.inf
        flat = delta.reshape(n, -1)
        best = np.argmin(flat, axis=1)
        index = np.arange(n)
        group, pi, ui = np.unravel_index(best, (*shape[1:], m))
        p, u = group * m + pi, group * m + ui
        v = after.reshape(n, -1)[index, best] / self.hd[u]
        return flat[index, best], p, u, v

    def _best_in_rows(
        self, w: np.ndarray, g: np.ndarray, keep: np.ndarray, removal: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        n, k = w.shape
        kept = keep.sum(axis=1)
        c = int(min(CANDIDATES, kept.max(initial=0), (k - kept).max(initial=0)))
        index = np.arange(n)
        if c == 0 or not (k - kept).any():
            return np.full(n, np.inf), np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n)
        cost = np.where(keep, removal, np.inf)
        p = np.argpartition(cost, c - 1, axis=1)[:, :c]  # the cheapest removals
        addition = np.where(keep, -np.inf, g * g / self.hd)
        u = np.argpartition(-addition, c - 1, axis=1)[:, :c]  # the best single additions
        wp = w[index[:, None], p]
        after = g[index[:, None, None], u[:, None, :]] + wp[:, :, None] * self.h[p[:, :, None], u[:, None, :]]
        delta = cost[index[:, None], p][:, :, None] - after * after / self.hd[u][:, None, :]
        delta[~np.isfinite(addition[index[:, None], u])[:, None, :].repeat(c, axis=1)] = np.inf
        flat = delta.reshape(n, -1)
        best = np.argmin(flat, axis=1)
        pi, ui = np.unravel_index(best, (c, c))
        pp, uu = p[index, pi], u[index, ui]
        v = after.reshape(n, -1)[index, best] / self.hd[uu]
        return flat[index, best], pp, uu, v

    def refit(self, rows: np.ndarray) -> None:
        """Step 3 on ``rows``: conjugate gradients on each row's support, ``(Ŵ H)_S = (W' H)_S``, from the current
        weights (the other rows are unchanged since their last solve)."""
        mask = self.keep[rows].astype(np.float64)
        w = self.w[rows]
        r = self.g[rows] * mask  # the residual of the normal equations is the masked gradient
        p = r.copy()
        rr = np.einsum("ij,ij->i", r, r)
        for _ in range(REFIT_STEPS):
            hp = (p @ self.h) * mask
            curvature = np.einsum("ij,ij->i", p, hp)
            alpha = rr / np.where(curvature > 0, curvature, np.inf)  # rows already solved have p = 0
            w += alpha[:, None] * p
            r -= alpha[:, None] * hp
            rr_next = np.einsum("ij,ij->i", r, r)
            if not rr_next.any():
                break
            p = r + (rr_next / np.where(rr > 0, rr, np.inf))[:, None] * p
            rr = rr_next
        delta = self.target[rows] - w
        g = delta @ self.h
        objective = np.einsum("ij,ij->i", delta, g)
        better = objective <= self.objective[rows]  # all but rounding: CG lowers a quadratic at every step
        rows = rows[better]
        self.w[rows], self.g[rows], self.objective[rows] = w[better], g[better], objective[better]


def _check(weight: np.ndarray, weight_hat: np.ndarray, gram: np.ndarray, pattern: Pattern, budget: int) -> None:
    if weight.ndim != 2 or weight_hat.shape != weight.shape:
        raise ValueError(
            f"weight and weight_hat must be the same (out, K), got {weight.shape} and {weight_hat.shape}"
        )
    k = weight.shape[1]
    if gram.shape != (k, k):
        raise ValueError(f"gram must be (K, K) = ({k}, {k}) for weight {weight.shape}, got {gram.shape}")
    if budget < 0:
        raise ValueError(f"the swap budget must be >= 0, got {budget}")
    if isinstance(pattern, NMPattern):
        if k % pattern.group:
            raise ValueError(f"K={k} is not a multiple of the group size {pattern.group}")
    elif not isinstance(pattern, Unstructured):
        raise TypeError(f"unsupported pattern {pattern!r}")
    elif pattern.scope is Scope.INPUT:
        raise ValueError("swaps keep each row's count: they cannot refine a mask compared per input channel")
