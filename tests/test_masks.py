"""Property tests of the mask functions against independent numpy definitions."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from graphprune.algorithms.layout import from_canonical, to_canonical
from graphprune.algorithms.masks import TIE_SEED, keep_top, mask_from_scores, nm_violations
from graphprune.algorithms.pattern import NMPattern, Scope, Unstructured

MASK64 = (1 << 64) - 1


def splitmix64(value: int) -> int:
    """The documented tie key, written independently with Python integers."""
    z = (value + TIE_SEED) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def reference_keep(scores: np.ndarray, flat_index: np.ndarray, count: int) -> np.ndarray:
    """Per row, the ``count`` largest scores, equal scores ordered by the larger tie key."""
    keep = np.zeros(scores.shape, dtype=bool)
    for row in range(scores.shape[0]):
        order = sorted(
            range(scores.shape[1]), key=lambda j: (-scores[row, j], -splitmix64(int(flat_index[row, j])))
        )
        keep[row, order[:count]] = True
    return keep


@st.composite
def nm_case(draw: st.DrawFn) -> tuple[np.ndarray, NMPattern]:
    group = draw(st.integers(2, 16))
    keep = draw(st.integers(1, group - 1))
    rows = draw(st.integers(1, 6))
    k = group * draw(st.integers(1, 5))
    # Few distinct values: ties are common, as in 4-bit-derived weights.
    levels = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**32 - 1))
    scores = np.random.default_rng(seed).integers(0, levels, size=(rows, k)).astype(np.float32)
    return scores, NMPattern(keep, group)


@given(nm_case())
@settings(max_examples=200, deadline=None)
def test_nm_keeps_exactly_n_per_group_and_the_highest_scores(case: tuple[np.ndarray, NMPattern]) -> None:
    scores, pattern = case
    mask = mask_from_scores(scores, pattern)
    groups_mask = mask.reshape(-1, pattern.group)
    groups = scores.reshape(-1, pattern.group)
    assert (groups_mask.sum(axis=1) == pattern.keep).all()
    assert nm_violations(np.where(mask, 1.0, 0.0), pattern).size == 0
    # every kept score >= every dropped score of its group
    kept_min = np.where(groups_mask, groups, np.inf).min(axis=1)
    dropped_max = np.where(groups_mask, -np.inf, groups).max(axis=1)
    assert (kept_min >= dropped_max).all()
    # the documented tie rule: equal scores are ordered by the tie key of their flat position
    index = np.arange(scores.size).reshape(groups.shape)
    np.testing.assert_array_equal(groups_mask, reference_keep(groups, index, pattern.keep))


@given(
    st.integers(1, 5),
    st.integers(1, 40),
    st.floats(0.0, 0.99),
    st.sampled_from(list(Scope)),
    st.integers(1, 5),
    st.integers(0, 2**32 - 1),
)
@settings(max_examples=200, deadline=None)
def test_unstructured_prunes_the_exact_count_per_group(
    rows: int, k: int, sparsity: float, scope: Scope, levels: int, seed: int
) -> None:
    scores = np.random.default_rng(seed).integers(0, levels, size=(rows, k)).astype(np.float32)
    mask = mask_from_scores(scores, Unstructured(sparsity, scope))
    index = np.arange(scores.size).reshape(scores.shape)
    groups = {
        Scope.OUTPUT: (scores, mask, index),
        Scope.LAYER: (scores.reshape(1, -1), mask.reshape(1, -1), index.reshape(1, -1)),
        Scope.INPUT: (scores.T, mask.T, index.T),
    }
    s, m, i = groups[scope]
    n = s.shape[1]
    assert (m.sum(axis=1) == n - int(n * sparsity)).all()
    np.testing.assert_array_equal(m, reference_keep(s, i, n - int(n * sparsity)))


def test_nan_scores_are_pruned_first() -> None:
    scores = np.array([[np.nan, 1.0, 2.0, np.nan]], np.float32)
    np.testing.assert_array_equal(mask_from_scores(scores, NMPattern(2, 4)), [[False, True, True, False]])


def test_keep_top_keeps_everything_at_zero_sparsity() -> None:
    assert keep_top(np.zeros((2, 3)), 0.0).all()


@given(st.integers(0, 2**32 - 1), st.sampled_from([(3, 4), (4, 3, 2, 2), (5, 2, 3)]), st.data())
@settings(max_examples=50, deadline=None)
def test_layout_round_trip(seed: int, shape: tuple[int, ...], data: st.DataObject) -> None:
    k_axis = data.draw(st.integers(0, len(shape) - 1))
    out_axis = data.draw(st.integers(0, len(shape) - 1).filter(lambda a: a != k_axis))
    w = np.random.default_rng(seed).standard_normal(shape)
    canonical = to_canonical(w, k_axis, out_axis)
    assert canonical.shape[0] == shape[out_axis] and canonical.shape[-1] == shape[k_axis]
    # canonical[o, :, k] holds the weights of output o and input channel k
    np.testing.assert_array_equal(
        np.sort(canonical[1, :, 0]),
        np.sort(np.take(np.take(w, 1, out_axis), 0, k_axis - (k_axis > out_axis)).ravel()),
    )
    np.testing.assert_array_equal(from_canonical(canonical, shape, k_axis, out_axis), w)
