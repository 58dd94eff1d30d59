"""Masks from importance scores: pure numpy, vectorised, deterministic.

Every scoring rule (magnitude, Wanda, SparseGPT's saliency) produces a score array in the canonical layout
``(out, K)`` or ``(out, R, K)`` (R: kernel positions of a Conv), and this module turns it into a boolean mask
(True = keep). N:M groups run along the last axis, K.

Tie rule: among equal scores, the weight with the larger *tie key* is kept. The key of a weight is a fixed
pseudo-random 64-bit number of its position: ``splitmix64(index + TIE_SEED)``, where ``index = r * K + k`` with
``k`` its position along K and ``r`` its row-major position over the other axes (in their order). So the same
weight always gets the same mask, and no position of a group is preferred: weights dequantised from 4-bit
blocks tie often, and "the earlier position wins" kept position 0 of a 2:4 group 54% of the time and
position 3 46%, which costs quality. NaN scores rank below every number, so they are pruned first.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from graphprune.algorithms.pattern import NMPattern, Pattern, Scope, Unstructured

TIE_SEED = 0x5EED_C0DE_2B4B_17E5  # fixed: the masks of a weight never change between runs or machines
_PAIRWISE_MAX_GROUP = 32  # beyond this, sorting each group beats M² pairwise comparisons

_U64 = np.uint64


def tie_keys(index: np.ndarray) -> np.ndarray:
    """The tie key (uint64) of each flat position ``index``: splitmix64 of ``index + TIE_SEED``."""
    z = np.asarray(index).astype(_U64) + _U64(TIE_SEED)
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def mask_from_scores(scores: np.ndarray, pattern: Pattern) -> np.ndarray:
    """Boolean keep-mask with the shape of ``scores`` (2-D ``(out, K)`` or 3-D ``(out, R, K)``)."""
    if scores.ndim not in (2, 3):
        raise ValueError(f"scores must be (out, K) or (out, R, K), got shape {scores.shape}")
    if isinstance(pattern, NMPattern):
        return nm_mask(scores, pattern)
    return unstructured_mask(_finite_scores(scores), pattern)


def nm_mask(scores: np.ndarray, pattern: NMPattern, axis: int = -1) -> np.ndarray:
    """Keep the ``keep`` highest scores of every ``group`` consecutive ones along ``axis`` (K).

    Works in any layout, so a stored ``[K, N]`` weight needs no transposed copy; ties follow the tie keys.
    """
    axis = axis % scores.ndim
    k = scores.shape[axis]
    m = pattern.group
    if k % m:
        raise ValueError(f"K={k} is not a multiple of the group size {m}")
    scores = _finite_scores(scores)
    if m > _PAIRWISE_MAX_GROUP:
        return _nm_mask_sorted(scores, pattern, axis)
    # (..., K/M, M, ...): position j of each group is the plane [..., :, j, ...].
    groups = scores.reshape(*scores.shape[:axis], k // m, m, *scores.shape[axis + 1 :])
    plane = [np.take(groups, j, axis=axis + 1) for j in range(m)]
    # rank = group members that beat this one: a higher score, or an equal score with a larger tie key.
    # Pairwise comparisons of the M planes (no sort), counted in the smallest integer type that holds M - 1.
    rank = [np.zeros(plane[0].shape, dtype=np.min_scalar_type(m - 1)) for _ in range(m)]
    for i in range(m):
        for j in range(i + 1, m):
            i_wins = plane[i] > plane[j]
            tied = np.flatnonzero(plane[i] == plane[j])
            if tied.size:
                base = _plane_index(tied, plane[i].shape, axis, k, m)
                i_wins.flat[tied] = tie_keys(base + i) > tie_keys(base + j)
            rank[j] += i_wins
            rank[i] += ~i_wins
    keep = np.stack([r < pattern.keep for r in rank], axis=axis + 1)
    return keep.reshape(scores.shape)


def unstructured_mask(scores: np.ndarray, pattern: Unstructured) -> np.ndarray:
    """Prune ``int(n * sparsity)`` lowest scores in each comparison group (as Wanda counts them)."""
    out = scores.shape[0]
    k = scores.shape[-1]
    flat = scores.reshape(out, -1)
    if pattern.scope is Scope.OUTPUT:
        return keep_top(flat, pattern.sparsity).reshape(scores.shape)
    if pattern.scope is Scope.LAYER:
        return keep_top(flat.reshape(1, -1), pattern.sparsity).reshape(scores.shape)
    columns = scores.reshape(-1, k).T  # (K, out*R): one row per input channel
    index = lambda row, at: at.astype(np.int64) * k + row  # noqa: E731  (row k, column j is flat j*K + k)
    return keep_top(np.ascontiguousarray(columns), pattern.sparsity, index).T.reshape(scores.shape)


def keep_top(
    rows: np.ndarray, sparsity: float, index: Callable[[int, np.ndarray], np.ndarray] | None = None
) -> np.ndarray:
    """Per row, keep the ``n - int(n * sparsity)`` highest scores; ties keep the larger tie keys.

    ``index(row, columns)`` gives the flat positions the tie keys are computed from (default: row-major).
    """
    n = rows.shape[1]
    n_keep = n - int(n * sparsity)
    if n_keep >= n:
        return np.ones(rows.shape, dtype=bool)
    # The n_keep-th largest score is the threshold: everything above it stays, and of the scores equal to
    # it, those with the largest tie keys fill the remaining places. O(n) per row, no full sort.
    threshold = np.partition(rows, n - n_keep, axis=1)[:, n - n_keep : n - n_keep + 1]
    keep = rows >= threshold
    surplus = keep.sum(axis=1) - n_keep  # scores equal to the threshold beyond the places left
    for row in np.flatnonzero(surplus):  # only rows with ties at the threshold: drop the smallest keys
        at = np.flatnonzero(rows[row] == threshold[row, 0])
        flat = index(int(row), at) if index is not None else int(row) * n + at.astype(np.int64)
        keep[row, at[np.argsort(tie_keys(flat), kind="stable")[: surplus[row]]]] = False
    return keep


def nm_violations(weight: np.ndarray, pattern: NMPattern) -> np.ndarray:
    """Indices (flat group numbers) of the groups along the last axis with more than ``keep`` non-zeros."""
    groups = weight.reshape(-1, pattern.group)
    return np.flatnonzero(np.count_nonzero(groups, axis=1) > pattern.keep)


def _plane_index(flat: np.ndarray, shape: tuple[int, ...], axis: int, k: int, m: int) -> np.ndarray:
    """Tie-key index (``r * K + k``) of position 0 of the groups at plane positions ``flat``."""
    coords = np.unravel_index(flat, shape)
    group = coords[axis].astype(np.int64)
    others = tuple(c for a, c in enumerate(coords) if a != axis)
    other_shape = tuple(s for a, s in enumerate(shape) if a != axis)
    r = np.ravel_multi_index(others, other_shape) if others else np.zeros_like(group)
    return r.astype(np.int64) * k + group * m


def _nm_mask_sorted(scores: np.ndarray, pattern: NMPattern, axis: int) -> np.ndarray:
    """N:M for large M: sort each group by (score, tie key) and keep the last ``keep``."""
    moved = np.moveaxis(scores, axis, -1)
    m = pattern.group
    flat = np.ascontiguousarray(moved).reshape(-1, m)
    keys = tie_keys(np.arange(flat.size, dtype=np.int64)).reshape(flat.shape)
    order = np.lexsort((keys, flat), axis=-1)  # ascending by score, then by key
    keep = np.zeros(flat.shape, dtype=bool)
    np.put_along_axis(keep, order[:, m - pattern.keep :], True, axis=1)
    return np.moveaxis(keep.reshape(moved.shape), -1, axis)


def _finite_scores(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.dtype != np.float64:
        scores = scores.astype(np.float32, copy=False)
    if np.isnan(scores).any():
        scores = np.where(np.isnan(scores), -np.inf, scores)
    return scores
