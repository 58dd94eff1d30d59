"""Masks keep their promises where the old ones did not: M > 255, and ties without a positional bias."""

from __future__ import annotations

import numpy as np
import pytest

from graphprune.algorithms.masks import mask_from_scores, nm_mask
from graphprune.algorithms.pattern import NMPattern, Scope, Unstructured


@pytest.mark.parametrize(("keep", "group"), [(100, 256), (200, 512), (3, 300), (255, 256)])
def test_large_groups_keep_exactly_n_highest(keep: int, group: int) -> None:
    rng = np.random.default_rng(group)
    scores = rng.integers(0, 5, size=(3, group * 2)).astype(np.float32)  # many ties
    mask = mask_from_scores(scores, NMPattern(keep, group))
    groups, kept = scores.reshape(-1, group), mask.reshape(-1, group)
    assert (kept.sum(axis=1) == keep).all()
    assert (np.where(kept, groups, np.inf).min(axis=1) >= np.where(kept, -np.inf, groups).max(axis=1)).all()


def test_large_groups_in_a_stored_layout_match_the_canonical_mask() -> None:
    scores = np.random.default_rng(1).integers(0, 3, size=(512, 6)).astype(np.float32)  # [K, N], K axis 0
    stored = nm_mask(scores, NMPattern(2, 256), axis=0)
    np.testing.assert_array_equal(stored, mask_from_scores(scores.T.copy(), NMPattern(2, 256)).T)


def test_small_groups_in_a_stored_layout_match_the_canonical_mask() -> None:
    scores = np.random.default_rng(2).integers(0, 2, size=(3, 16, 5)).astype(np.float32)  # [out, K, kw]
    stored = nm_mask(scores, NMPattern(2, 4), axis=1)
    canonical = mask_from_scores(np.moveaxis(scores, 1, -1).copy(), NMPattern(2, 4))
    np.testing.assert_array_equal(stored, np.moveaxis(canonical, -1, 1))


def _position_frequencies(mask: np.ndarray, scores: np.ndarray, group: int) -> np.ndarray:
    """How often each position of fully tied groups is kept."""
    groups, kept = scores.reshape(-1, group), mask.reshape(-1, group)
    tied = (groups == groups[:, :1]).all(axis=1)
    assert tied.sum() > 20_000
    return kept[tied].mean(axis=0)


def test_tied_2_4_groups_keep_every_position_equally_often() -> None:
    # Weights dequantised from 4-bit blocks: magnitudes take few values, whole groups tie.
    levels = np.random.default_rng(5).integers(0, 2, size=(512, 2048)).astype(np.float32)
    for axis, scores in ((-1, levels), (0, levels.T.copy())):
        mask = nm_mask(scores, NMPattern(2, 4), axis=axis)
        canonical = (mask if axis == -1 else mask.T).copy()
        np.testing.assert_allclose(_position_frequencies(canonical, levels, 4), 0.5, atol=0.02)
        # over every group (the statistic that showed 54/51/48/46% under "the earlier position wins")
        np.testing.assert_allclose(canonical.reshape(-1, 4).mean(axis=0), 0.5, atol=0.01)


def test_partially_tied_groups_have_no_positional_bias() -> None:
    # Group (a, b, b, b) with a > b: the two remaining places among the three tied b's are shared fairly.
    rng = np.random.default_rng(7)
    scores = np.ones((512, 4096), np.float32)
    top = rng.integers(0, 4, size=scores.size // 4)
    scores.reshape(-1, 4)[np.arange(top.size), top] = 2.0
    kept = mask_from_scores(scores, NMPattern(2, 4)).reshape(-1, 4)
    assert kept[np.arange(top.size), top].all()
    for winner in range(4):
        rows = kept[top == winner]
        others = [p for p in range(4) if p != winner]
        np.testing.assert_allclose(rows[:, others].mean(axis=0), 1 / 3, atol=0.02)


def test_unstructured_ties_have_no_positional_bias() -> None:
    scores = np.random.default_rng(9).integers(0, 2, size=(64, 4096)).astype(np.float32)
    for scope in Scope:
        mask = mask_from_scores(scores, Unstructured(0.75, scope))
        ones = scores == 1  # 50% of the scores are 1; 25% are kept: half of the ones
        first, last = mask[:, :2048][ones[:, :2048]].mean(), mask[:, 2048:][ones[:, 2048:]].mean()
        assert abs(first - last) < 0.02, (scope, first, last)
        assert abs(first - 0.5) < 0.02


def test_masks_are_deterministic() -> None:
    scores = np.zeros((8, 64), np.float32)
    first = mask_from_scores(scores, NMPattern(2, 4))
    np.testing.assert_array_equal(first, mask_from_scores(scores.copy(), NMPattern(2, 4)))
    assert not (first == np.tile([True, True, False, False], 128).reshape(8, 64)).all()
