"""Channel permutation search against independent references: identity, brute force, the masking code path."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from graphprune.algorithms.masks import nm_mask
from graphprune.algorithms.pattern import NMPattern
from graphprune.algorithms.permutation import invert, kept_importance, search_permutation

PATTERN = NMPattern(2, 4)


def kept_by_the_mask(scores: np.ndarray, order: np.ndarray, pattern: NMPattern) -> float:
    """What the pruning pass keeps: the N:M mask of the reordered scores, summed."""
    permuted = scores[:, order]
    return float((permuted * nm_mask(permuted, pattern)).sum(dtype=np.float64))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("pattern", [NMPattern(2, 4), NMPattern(1, 4), NMPattern(4, 8)], ids=str)
def test_never_below_the_identity_order(seed: int, pattern: NMPattern) -> None:
    rng = np.random.default_rng(seed)
    rows, k = rng.integers(1, 40), pattern.group * rng.integers(1, 12)
    scores = np.abs(rng.standard_normal((rows, k))) * rng.lognormal(0, 1, size=k)
    result = search_permutation(scores, pattern)
    assert sorted(result.order.tolist()) == list(range(k))
    identity = kept_by_the_mask(scores, np.arange(k), pattern)
    ours = kept_by_the_mask(scores, result.order, pattern)
    assert ours >= identity * (1 - 1e-6)
    assert result.kept == pytest.approx(ours, rel=1e-5)
    assert result.identity_kept == pytest.approx(identity, rel=1e-5)
    assert 0.0 <= result.recovered <= 1.0


def test_strictly_better_where_important_channels_share_a_group() -> None:
    # Channels 0-3 matter in every row, 4-7 hardly: in order, the first group must drop two important ones.
    scores = np.tile([10.0, 9.0, 8.0, 7.0, 1.0, 1.0, 1.0, 1.0], (5, 1))
    result = search_permutation(scores, PATTERN)
    assert result.identity_kept == pytest.approx(5 * (10 + 9 + 1 + 1))
    assert result.kept == pytest.approx(5 * (10 + 9 + 8 + 7))
    assert result.recovered == pytest.approx((34 - 21) / (38 - 21))  # two light ones must go in any order


def test_two_groups_reach_the_brute_force_optimum() -> None:
    rng = np.random.default_rng(9)
    for _ in range(5):
        scores = np.abs(rng.standard_normal((7, 8))) * rng.lognormal(0, 1, size=8)
        best = max(
            kept_importance(scores, PATTERN, np.array([*first, *(c for c in range(8) if c not in first)]))
            for first in itertools.combinations(range(8), 4)
        )
        assert search_permutation(scores, PATTERN).kept == pytest.approx(best, rel=1e-6)


def test_kept_importance_agrees_with_the_masks() -> None:
    rng = np.random.default_rng(3)
    scores = np.abs(rng.standard_normal((6, 24)))
    order = rng.permutation(24)
    assert kept_importance(scores, PATTERN, order) == pytest.approx(kept_by_the_mask(scores, order, PATTERN))


def test_deterministic_and_invertible() -> None:
    rng = np.random.default_rng(4)
    scores = np.abs(rng.standard_normal((30, 64))) * rng.lognormal(0, 1, size=64)
    a, b = search_permutation(scores, PATTERN), search_permutation(scores, PATTERN)
    np.testing.assert_array_equal(a.order, b.order)
    np.testing.assert_array_equal(invert(a.order)[a.order], np.arange(64))


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple of the group"):
        search_permutation(np.ones((2, 6)), PATTERN)
    with pytest.raises(ValueError, match="rows, K"):
        search_permutation(np.ones(8), PATTERN)


@pytest.mark.parametrize("pattern", [NMPattern(2, 4), NMPattern(1, 4), NMPattern(3, 8)], ids=str)
def test_every_split_of_a_pair_is_scored_as_the_masks_score_it(pattern: NMPattern) -> None:
    """The pair move's objective (2:4's pair-sum shortcut included), split by split, against the N:M mask of
    the two groups the split makes."""
    from graphprune.algorithms.permutation import _kept_by_split, _splits

    rng = np.random.default_rng(5)
    m = pattern.group
    values = np.abs(rng.standard_normal((3, 2 * m, 7))).astype(np.float32)  # (pairs, 2M channels, rows)
    splits = _splits(m)
    got = _kept_by_split(values, pattern, splits)
    for p in range(3):
        for move, split in enumerate(splits):
            scores = values[p].T.astype(np.float64)  # (rows, 2M): the two groups side by side
            expected = kept_by_the_mask(scores, split, pattern)
            assert got[p, move] == pytest.approx(expected, rel=1e-6)
