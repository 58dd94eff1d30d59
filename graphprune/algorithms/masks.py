"""Masks from importance scores: pure numpy, vectorised, deterministic.

Every scoring rule (magnitude, Wanda, SparseGPT's saliency) produces a score array in the canonical layout
``(out, K)`` or ``(out, R, K)`` (R: kernel positions of a Conv), and this module turns it into a boolean mask
(True = keep). N:M groups run along the last axis, K.

Tie rule: among equal scores, the weight at the lower index is kept (for N:M: the earlier position in its group
of M along K; for unstructured: the earlier position in the comparison group's row-major order). NaN scores
rank below every number, so they are pruned first.
"""

from __future__ import annotations

import numpy as np

from graphprune.algorithms.pattern import NMPattern, Pattern, Scope, Unstructured


def mask_from_scores(scores: np.ndarray, pattern: Pattern) -> np.ndarray:
    """Boolean keep-mask with the shape of ``scores`` (2-D ``(out, K)`` or 3-D ``(out, R, K)``)."""
    if scores.ndim not in (2, 3):
        raise ValueError(f"scores must be (out, K) or (out, R, K), got shape {scores.shape}")
    if isinstance(pattern, NMPattern):
        return nm_mask(scores, pattern)
    return unstructured_mask(_finite_scores(scores), pattern)


def nm_mask(scores: np.ndarray, pattern: NMPattern, axis: int = -1) -> np.ndarray:
    """Keep the ``keep`` highest scores of every ``group`` consecutive ones along ``axis`` (K).

    Works in any layout, so a stored ``[K, N]`` weight needs no transposed copy.
    """
    axis = axis % scores.ndim
    k = scores.shape[axis]
    if k % pattern.group:
        raise ValueError(f"K={k} is not a multiple of the group size {pattern.group}")
    m = pattern.group
    scores = _finite_scores(scores)
    # (..., K/M, M, ...): position j of each group is the plane [..., :, j, ...].
    groups = scores.reshape(*scores.shape[:axis], k // m, m, *scores.shape[axis + 1 :])
    plane = [np.take(groups, j, axis=axis + 1) for j in range(m)]
    # rank = group members that beat this one: a higher score, or an equal score at an earlier position.
    # Pairwise comparisons of the M planes (no sort), counted in uint8 to keep memory traffic low.
    rank = [np.zeros(plane[0].shape, dtype=np.uint8) for _ in range(m)]
    for i in range(m):
        for j in range(i + 1, m):
            i_wins = plane[i] >= plane[j]  # ties go to the earlier position i
            rank[j] += i_wins
            rank[i] += ~i_wins
    keep = np.stack([r < pattern.keep for r in rank], axis=axis + 1)
    return keep.reshape(scores.shape)


def unstructured_mask(scores: np.ndarray, pattern: Unstructured) -> np.ndarray:
    """Prune ``int(n * sparsity)`` lowest scores in each comparison group (as Wanda counts them)."""
    out = scores.shape[0]
    flat = scores.reshape(out, -1)
    if pattern.scope is Scope.OUTPUT:
        return keep_top(flat, pattern.sparsity).reshape(scores.shape)
    if pattern.scope is Scope.LAYER:
        return keep_top(flat.reshape(1, -1), pattern.sparsity).reshape(scores.shape)
    columns = scores.reshape(-1, scores.shape[-1]).T  # (K, out*R): one row per input channel
    return keep_top(np.ascontiguousarray(columns), pattern.sparsity).T.reshape(scores.shape)


def keep_top(rows: np.ndarray, sparsity: float) -> np.ndarray:
    """Per row, keep the ``n - int(n * sparsity)`` highest scores; ties keep the earlier position."""
    n = rows.shape[1]
    n_keep = n - int(n * sparsity)
    if n_keep >= n:
        return np.ones(rows.shape, dtype=bool)
    # The n_keep-th largest score is the threshold: everything above it stays, and of the scores equal to
    # it, the leftmost ones fill the remaining places. O(n) per row, no full sort.
    threshold = np.partition(rows, n - n_keep, axis=1)[:, n - n_keep : n - n_keep + 1]
    keep = rows >= threshold
    surplus = keep.sum(axis=1) - n_keep  # scores equal to the threshold beyond the places left
    for row in np.flatnonzero(surplus):  # only rows with ties at the threshold: drop the rightmost ones
        at = np.flatnonzero(rows[row] == threshold[row, 0])
        keep[row, at[len(at) - surplus[row] :]] = False
    return keep


def nm_violations(weight: np.ndarray, pattern: NMPattern) -> np.ndarray:
    """Indices (flat group numbers) of the groups along the last axis with more than ``keep`` non-zeros."""
    groups = weight.reshape(-1, pattern.group)
    return np.flatnonzero(np.count_nonzero(groups, axis=1) > pattern.keep)


def _finite_scores(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.dtype != np.float64:
        scores = scores.astype(np.float32, copy=False)
    if np.isnan(scores).any():
        scores = np.where(np.isnan(scores), -np.inf, scores)
    return scores
