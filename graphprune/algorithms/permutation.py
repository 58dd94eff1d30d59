"""Channel permutation for N:M sparsity: the order of K that keeps the most importance under the mask.

An N:M mask keeps the N largest scores of every M *consecutive* weights along K, so two important input
channels that sit in one group compete for its N places in every row. Reordering K (where the graph absorbs
the reordering exactly, see :mod:`graphprune.passes.permute`) lets each group hold channels of mixed
importance. The objective, for an importance matrix ``S`` ``(rows, K)`` (the chosen method's score: |W|·‖X‖
for Wanda and, as their ordering saliency, for SparseGPT and ALPS; |W| for magnitude)::

    kept(π) = Σ_rows Σ_groups  (sum of the N largest of S[row, π(group)])

Search (after Pool & Yu, NeurIPS 2021, and NVIDIA apex ASP's channel swaps; RIA's "balanced" start):

1. start from the better of the identity and a *balanced deal*: channels sorted by total importance and dealt
   to the groups in a snake order, so that every group gets one of the heaviest, one of the next, ...;
2. refine by rounds of exact two-group moves: the groups are paired at random (seeded), and each pair's 2M
   channels are re-split between the two groups in the best of all ways (all C(2M, M)/2 splits for M ≤ 4, the
   M² single swaps beyond), every pair of a round at once. Stop after ``rounds`` rounds, or after a round
   that improved the total by less than ``tolerance`` (relative).

The result is never below the identity order (both steps only accept improvements) and is deterministic for
a given seed. Pure numpy.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np

from graphprune.algorithms.pattern import NMPattern

# Work per chunk of a round (elements of a (pairs, moves, rows, 2M) block): bounds the temporaries so they stay
# in cache (the sizes tried: BENCHMARKS.md, "Figures moved out of the code").
_CHUNK_ELEMENTS = 1 << 21


@dataclass(frozen=True)
class PermutationResult:
    """``order``: the new position i holds old channel ``order[i]``; the importance kept before and after."""

    order: np.ndarray
    identity_kept: float
    kept: float
    total: float  # all importance: what a dense weight keeps

    @property
    def recovered(self) -> float:
        """Share of the importance the identity order's mask loses that the permutation keeps."""
        lost = self.total - self.identity_kept
        return (self.kept - self.identity_kept) / lost if lost > 0 else 0.0


def kept_importance(scores: np.ndarray, pattern: NMPattern, order: np.ndarray | None = None) -> float:
    """Σ over rows and groups of the ``keep`` largest scores of each group of ``group`` (in ``order``)."""
    s = scores if order is None else scores[:, order]
    rows, k = s.shape
    groups = np.sort(s.reshape(rows, k // pattern.group, pattern.group), axis=-1)
    return float(groups[..., pattern.group - pattern.keep :].sum(dtype=np.float64))


def search_permutation(
    scores: np.ndarray, pattern: NMPattern, rounds: int = 20, tolerance: float = 1e-4, seed: int = 0
) -> PermutationResult:
    """The order of K (the last axis of ``scores``) that keeps the most importance; see the module docstring."""
    if scores.ndim != 2:
        raise ValueError(f"scores must be (rows, K), got shape {scores.shape}")
    k, m = scores.shape[1], pattern.group
    if k % m:
        raise ValueError(f"K={k} is not a multiple of the group size {m}")
    s = np.abs(np.nan_to_num(np.asarray(scores, dtype=np.float32)))
    identity = np.arange(k)
    identity_kept = kept_importance(s, pattern)
    total = float(s.sum(dtype=np.float64))
    order, kept = identity, identity_kept
    dealt = _balanced_deal(s, m)
    dealt_kept = kept_importance(s, pattern, dealt)
    if dealt_kept > kept:
        order, kept = dealt, dealt_kept
    n_groups = k // m
    if n_groups >= 2:
        rng = np.random.default_rng(seed)
        splits = _splits(m)
        s_t = np.ascontiguousarray(s.T)
        for _ in range(rounds):
            before = kept
            pairing = rng.permutation(n_groups)[: 2 * (n_groups // 2)].reshape(-1, 2)
            order = _improve_pairs(s_t, pattern, order, pairing, splits)
            kept = kept_importance(s, pattern, order)
            if kept - before <= tolerance * max(abs(before), 1e-30):
                break
    if kept < identity_kept:  # float noise in a sum can tip an equal order below; never return worse
        order, kept = identity, identity_kept
    return PermutationResult(order, identity_kept, kept, total)


def _balanced_deal(s: np.ndarray, m: int) -> np.ndarray:
    """Channels by total importance, dealt in a snake order: group g gets ranks g, 2G-1-g, 2G+g, ..."""
    k = s.shape[1]
    n_groups = k // m
    ranked = np.argsort(-s.sum(axis=0, dtype=np.float64), kind="stable")
    slots = np.empty((n_groups, m), dtype=np.int64)
    for lap in range(m):
        chunk = ranked[lap * n_groups : (lap + 1) * n_groups]
        slots[:, lap] = chunk if lap % 2 == 0 else chunk[::-1]
    return slots.reshape(-1)


@functools.cache
def _splits(m: int) -> np.ndarray:
    """Moves for a pair of groups: index arrays (moves, 2M) over the pair's 2M channels, first M -> group a.

    All C(2M, M)/2 splits (the identity first) for M ≤ 4, else the identity and the M² single swaps.
    """
    both = list(range(2 * m))
    if m <= 4:
        moves = []
        for first in itertools.combinations(both, m):
            if 0 not in first:  # a split and its mirror are the same move
                continue
            moves.append([*first, *(c for c in both if c not in first)])
        return np.array(moves, dtype=np.int64)
    moves = [both]
    for i in range(m):
        for j in range(m, 2 * m):
            swapped = both.copy()
            swapped[i], swapped[j] = j, i
            moves.append(swapped)
    return np.array(moves, dtype=np.int64)


def _improve_pairs(
    s_t: np.ndarray, pattern: NMPattern, order: np.ndarray, pairing: np.ndarray, splits: np.ndarray
) -> np.ndarray:
    """Re-split every pair of groups of ``pairing`` in its best way (ties keep the current split).

    ``s_t`` is the importance transposed, ``(K, rows)``, so that gathering channels reads contiguous rows.
    """
    m = pattern.group
    order = order.copy()
    groups = order.reshape(-1, m)  # a view: writing a group writes the order
    rows = s_t.shape[1]
    step = max(1, _CHUNK_ELEMENTS // (len(splits) * rows * 2 * m))
    for start in range(0, len(pairing), step):
        pairs = pairing[start : start + step]
        channels = np.concatenate([groups[pairs[:, 0]], groups[pairs[:, 1]]], axis=1)  # (P, 2M)
        kept = _kept_by_split(s_t[channels], pattern, splits)  # (P, moves)
        best = np.argmax(kept, axis=1)  # the first maximum: the identity split wins ties
        chosen = channels[np.arange(len(pairs))[:, None], splits[best]]
        groups[pairs[:, 0]] = chosen[:, :m]
        groups[pairs[:, 1]] = chosen[:, m:]
    return groups.reshape(-1)


def _kept_by_split(values: np.ndarray, pattern: NMPattern, splits: np.ndarray) -> np.ndarray:
    """Importance both groups keep under each split, summed over rows: ``(P, 2M, rows)`` -> ``(P, moves)``."""
    m = pattern.group
    kept = np.zeros((values.shape[0], len(splits)), dtype=np.float64)
    if (pattern.keep, m) == (2, 4):
        # The best two of four is the largest of the four's six pair sums: form the 28 pair sums of the eight
        # channels once, then each half of each split is a maximum over six of them (no sort, no gathered halves).
        a, b = _CHANNEL_PAIRS.T
        sums = values[:, a] + values[:, b]  # (P, 28, rows)
        for half in _half_pairs_2of4():
            top = sums[:, half[:, 0]]
            for j in range(1, half.shape[1]):
                np.maximum(top, sums[:, half[:, j]], out=top)
            kept += top.sum(axis=-1, dtype=np.float64)
        return kept
    for half in (splits[:, :m], splits[:, m:]):
        top = np.sort(values[:, half], axis=-2)[..., m - pattern.keep :, :]  # (P, moves, N, rows)
        kept += top.sum(axis=(-1, -2), dtype=np.float64)
    return kept


_CHANNEL_PAIRS = np.array(list(itertools.combinations(range(8), 2)), dtype=np.int64)  # 2:4's pairs of 2M = 8


@functools.cache
def _half_pairs_2of4() -> tuple[np.ndarray, np.ndarray]:
    """For each 2:4 split (``_splits(4)``), the indices into ``_CHANNEL_PAIRS`` of each half's six pairs."""
    index = {tuple(p): i for i, p in enumerate(_CHANNEL_PAIRS.tolist())}
    splits = _splits(4)
    halves = (splits[:, :4], splits[:, 4:])
    return tuple(
        np.array([[index[p] for p in itertools.combinations(sorted(h), 2)] for h in half]) for half in halves
    )  # type: ignore[return-value]  # tuple() of a 2-item generator: a pair


def invert(order: np.ndarray) -> np.ndarray:
    """The inverse permutation: ``invert(order)[order[i]] == i``."""
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return inverse
