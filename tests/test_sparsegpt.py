"""SparseGPT solver: against a dense, unblocked OBS implementation, quality ordering, and its guarantees."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphprune.algorithms.masks import mask_from_scores, nm_violations
from graphprune.algorithms.pattern import NMPattern, Pattern, Scope, Unstructured
from graphprune.algorithms.sparsegpt import (
    _inverse_cholesky_upper,
    sparsegpt,
    sparsegpt_reconstruction_error,
    sparsegpt_with_mask,
)

# --------------------------------------------------------------------------------------------------------------
# An independent reference: the equations written out densely. The inverse Hessian of the columns not yet
# fixed is kept explicitly as a full K x K matrix and shrunk by one Schur elimination per column; a pruned
# weight moves the remaining ones of its row by the OBS formula δ = -w_j / [H_F⁻¹]_jj · [H_F⁻¹]_j,: .
# No Cholesky factor, no blocks, no lazy batching; selection by plain Python sorting.
# --------------------------------------------------------------------------------------------------------------


def _pruned_by_sorting(scores: list[float], n_prune: int) -> list[int]:
    """Indices of the n_prune lowest scores; among equal scores the later index goes first."""
    order = sorted(range(len(scores)), key=lambda t: (scores[t], -t))
    return order[:n_prune]


def dense_obs_reference(
    weight: np.ndarray, gram: np.ndarray, pattern: Pattern, percdamp: float, blocksize: int
) -> tuple[np.ndarray, np.ndarray]:
    w = weight.astype(np.float64).copy()
    h = gram.astype(np.float64).copy()
    rows, k = w.shape
    for j in range(k):
        if h[j, j] == 0.0:
            h[j, j] = 1.0
            w[:, j] = 0.0
    h += percdamp * np.mean(np.diag(h)) * np.eye(k)
    # The saliency denominators are fixed by the column order: [H_F⁻¹]_jj with F = {j, .., K-1}.
    d2 = np.array([np.linalg.inv(h[j:, j:])[0, 0] for j in range(k)])
    hinv = np.linalg.inv(h)
    keep = np.ones((rows, k), dtype=bool)

    if isinstance(pattern, Unstructured):
        if pattern.scope is Scope.LAYER:
            total = int(rows * k * pattern.sparsity)
        elif pattern.scope is Scope.OUTPUT:
            total = int(k * pattern.sparsity)
        else:
            total = int(rows * pattern.sparsity)

    for j in range(k):
        if isinstance(pattern, Unstructured) and j % blocksize == 0:
            cols = list(range(j, min(j + blocksize, k)))
            score = w[:, cols] ** 2 / d2[cols]
            share = (total * (cols[-1] + 1)) // k - (total * j) // k
            if pattern.scope is Scope.LAYER:
                flat = [float(v) for v in score.reshape(-1)]
                for t in _pruned_by_sorting(flat, share):
                    keep[t // len(cols), cols[t % len(cols)]] = False
            elif pattern.scope is Scope.OUTPUT:
                for r in range(rows):
                    for t in _pruned_by_sorting([float(v) for v in score[r]], share):
                        keep[r, cols[t]] = False
            else:
                for c in range(len(cols)):
                    for t in _pruned_by_sorting([float(v) for v in score[:, c]], total):
                        keep[t, cols[c]] = False
        if isinstance(pattern, NMPattern) and j % pattern.group == 0:
            cols = list(range(j, j + pattern.group))
            for r in range(rows):
                score = [float(w[r, c] ** 2 / d2[c]) for c in cols]
                for t in _pruned_by_sorting(score, pattern.group - pattern.keep):
                    keep[r, cols[t]] = False

        assert hinv[j, j] == pytest.approx(d2[j], rel=1e-8)
        for r in range(rows):
            if not keep[r, j]:
                w[r, j:] -= w[r, j] / hinv[j, j] * hinv[j, j:]
                w[r, j] = 0.0
        hinv = hinv - np.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return w, keep


def correlated_layer(
    rows: int, k: int, n: int, seed: int, dead: tuple[int, ...] = ()
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weight (rows, K), inputs X (n, K) with correlated channels of very different scales, H = XᵀX."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)
    scales = np.exp(rng.normal(0.0, 1.0, k))
    x = (rng.standard_normal((n, k)) @ mixing) * scales
    x[:, list(dead)] = 0.0
    w = rng.standard_normal((rows, k))
    return w, x, x.T @ x


PATTERNS = [
    Unstructured(0.5, Scope.LAYER),
    Unstructured(0.6, Scope.OUTPUT),
    Unstructured(0.3, Scope.INPUT),
    NMPattern(2, 4),
    NMPattern(4, 8),
    NMPattern(1, 4),
]


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: f"{p}-{getattr(p, 'scope', '')}")
@pytest.mark.parametrize(("rows", "k", "blocksize"), [(12, 32, 8), (7, 40, 16), (5, 24, 128)])
def test_matches_dense_obs_reference(pattern: Pattern, rows: int, k: int, blocksize: int) -> None:
    w, _, h = correlated_layer(rows, k, 3 * k, seed=rows * k + blocksize, dead=(3,))
    ref_w, ref_keep = dense_obs_reference(w, h, pattern, 0.01, blocksize)
    got_w, got_keep = sparsegpt_with_mask(w, h, pattern, percdamp=0.01, blocksize=blocksize)
    np.testing.assert_array_equal(got_keep, ref_keep)
    np.testing.assert_allclose(got_w, ref_w, rtol=1e-8, atol=1e-9 * np.abs(w).max())


@pytest.mark.parametrize("k", [1, 7, 64, 65, 300])
def test_inverse_cholesky_factor(k: int) -> None:
    _, _, h = correlated_layer(2, k, 2 * k + 3, seed=k)
    u = _inverse_cholesky_upper(h, np.zeros((1, k)), 0.01)
    damped = h + 0.01 * np.mean(np.diag(h)) * np.eye(k)
    assert not np.tril(u, -1).any()
    assert (np.diag(u) > 0).all()
    np.testing.assert_allclose(u.T @ u @ damped, np.eye(k), atol=1e-8)


def test_float32_compute_close_to_float64() -> None:
    w, _, h = correlated_layer(16, 64, 256, seed=5)
    w64 = sparsegpt(w, h, NMPattern(2, 4), blocksize=16)
    w32, keep32 = sparsegpt_with_mask(w, h, NMPattern(2, 4), blocksize=16, compute_dtype=np.float32)
    assert w32.dtype == np.float64
    assert not w32[~keep32].any()
    assert not nm_violations(w32, NMPattern(2, 4)).size
    np.testing.assert_allclose(w32, w64, rtol=1e-3, atol=1e-4 * np.abs(w64).max())


@pytest.mark.parametrize("pattern", [NMPattern(2, 4), NMPattern(4, 8)], ids=str)
def test_nm_result_does_not_depend_on_blocksize(pattern: NMPattern) -> None:
    # Lazy batching is exact algebra: for N:M (masks chosen column group by column group) the block size only
    # changes the order of the floating-point operations.
    w, _, h = correlated_layer(9, 48, 100, seed=11)
    results = [sparsegpt(w, h, pattern, blocksize=b) for b in (4, 8, 24, 48, 1000)]
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], rtol=1e-9, atol=1e-10)


def _wanda_and_magnitude(w: np.ndarray, x: np.ndarray, pattern: Pattern) -> tuple[np.ndarray, np.ndarray]:
    wanda = w * mask_from_scores(np.abs(w) * np.linalg.norm(x, axis=0), pattern)
    magnitude = w * mask_from_scores(np.abs(w), pattern)
    return wanda, magnitude


@pytest.mark.parametrize(
    "pattern",
    [Unstructured(0.5, Scope.OUTPUT), Unstructured(0.5, Scope.LAYER), NMPattern(2, 4), NMPattern(4, 8)],
    ids=lambda p: f"{p}-{getattr(p, 'scope', '')}",
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reconstruction_beats_wanda_which_beats_magnitude(pattern: Pattern, seed: int) -> None:
    # K = 256 with the default block size 128: two blocks. (With much smaller blocks the per-block quota of
    # unstructured selection acts like a coarse N:M constraint and can lose to Wanda's row-wide mask when
    # channel scales differ by orders of magnitude, as they do here.)
    w, x, h = correlated_layer(64, 256, 1000, seed=seed)
    wanda, magnitude = _wanda_and_magnitude(w, x, pattern)
    ours = sparsegpt(w, h, pattern)
    error = {
        name: sparsegpt_reconstruction_error(w, w_hat, h)
        for name, w_hat in [("sparsegpt", ours), ("wanda", wanda), ("magnitude", magnitude)]
    }
    assert error["sparsegpt"] < 0.95 * error["wanda"], error
    assert error["wanda"] < error["magnitude"], error
    # The same budget for all three.
    assert np.count_nonzero(ours) == np.count_nonzero(wanda) == np.count_nonzero(magnitude)


def test_reconstruction_error_is_output_error() -> None:
    w, x, h = correlated_layer(6, 10, 30, seed=4)
    w_hat = w * (np.arange(10) % 2 == 0)
    expected = float(np.sum((x @ w.T - x @ w_hat.T) ** 2))
    assert sparsegpt_reconstruction_error(w, w_hat, h) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: f"{p}-{getattr(p, 'scope', '')}")
def test_dead_inputs_give_zero_columns_and_finite_weights(pattern: Pattern) -> None:
    w, _, h = correlated_layer(10, 32, 80, seed=6, dead=(0, 5, 6, 31))
    out = sparsegpt(w, h, pattern, blocksize=8)
    assert np.isfinite(out).all()
    assert not out[:, [0, 5, 6, 31]].any()


def test_all_inputs_dead() -> None:
    w = np.random.default_rng(0).standard_normal((4, 8))
    out = sparsegpt(w, np.zeros((8, 8)), NMPattern(2, 4))
    assert not out.any()


def test_float16_round_trip() -> None:
    w, _, h = correlated_layer(16, 64, 200, seed=7)
    w16 = w.astype(np.float16)
    out, keep = sparsegpt_with_mask(w16, h, NMPattern(2, 4), blocksize=16)
    assert out.dtype == np.float16
    assert np.isfinite(out).all()
    assert not out[~keep].any()
    assert not nm_violations(out, NMPattern(2, 4)).size
    expected = sparsegpt(w16.astype(np.float64), h, NMPattern(2, 4), blocksize=16)
    np.testing.assert_array_equal(out, expected.astype(np.float16))


def test_float32_in_float32_out() -> None:
    w, _, h = correlated_layer(8, 16, 50, seed=8)
    assert sparsegpt(w.astype(np.float32), h, Unstructured(0.5, Scope.LAYER)).dtype == np.float32


def test_tie_rules() -> None:
    # H = I: every saliency denominator is equal and the OBS updates vanish, so only the tie rule decides.
    w = np.ones((3, 8))
    h = np.eye(8)
    _, keep = sparsegpt_with_mask(w, h, NMPattern(2, 4))
    # N:M: each group's ties follow the masks' tie keys of the (rows, M) slice the solver masks at a time
    np.testing.assert_array_equal(keep, np.tile(mask_from_scores(np.ones((3, 4)), NMPattern(2, 4)), (1, 2)))
    _, keep = sparsegpt_with_mask(w, h, Unstructured(0.5, Scope.OUTPUT))
    np.testing.assert_array_equal(keep, np.tile([True] * 4 + [False] * 4, (3, 1)))
    _, keep = sparsegpt_with_mask(w, h, Unstructured(0.5, Scope.LAYER))
    assert keep.reshape(-1).tolist() == [True] * 12 + [False] * 12
    _, keep = sparsegpt_with_mask(w, h, Unstructured(0.5, Scope.INPUT))
    # int(3 * 0.5) = 1 pruned per column: the last row.
    np.testing.assert_array_equal(keep, np.array([[True] * 8, [True] * 8, [False] * 8]))


def test_zero_sparsity_is_identity() -> None:
    w, _, h = correlated_layer(5, 12, 40, seed=9)
    np.testing.assert_array_equal(sparsegpt(w, h, Unstructured(0.0, Scope.LAYER)), w)


@pytest.mark.parametrize(
    ("weight_shape", "gram_shape", "pattern", "message"),
    [
        ((4, 6), (6, 6), NMPattern(2, 4), "multiple of the group"),
        ((4, 8), (6, 6), NMPattern(2, 4), "gram must be"),
        ((4, 8, 1), (8, 8), NMPattern(2, 4), "weight must be"),
    ],
)
def test_bad_inputs(
    weight_shape: tuple[int, ...], gram_shape: tuple[int, int], pattern: Pattern, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        sparsegpt(np.ones(weight_shape), np.eye(gram_shape[0])[: gram_shape[0], : gram_shape[1]], pattern)


def test_non_finite_inputs_are_rejected() -> None:
    h = np.eye(4)
    h[1, 2] = np.nan
    with pytest.raises(ValueError, match="finite"):
        sparsegpt(np.ones((2, 4)), h, NMPattern(2, 4))


def test_indefinite_gram_is_reported() -> None:
    h = -np.eye(4)
    with pytest.raises(ValueError, match="positive definite"):
        sparsegpt(np.ones((2, 4)), h, NMPattern(2, 4))


# --------------------------------------------------------------------------------------------------------------
# Property tests: the guarantees hold for any shape, pattern and block size.
# --------------------------------------------------------------------------------------------------------------

nm_patterns = st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8)]).map(lambda t: NMPattern(*t))
unstructured_patterns = st.builds(
    Unstructured,
    st.floats(0.0, 0.95, allow_nan=False).map(lambda s: round(s, 3)),
    st.sampled_from(list(Scope)),
)


def _random_problem(seed: int, rows: int, k: int, n: int, n_dead: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, k)) @ rng.standard_normal((k, k))
    x[:, rng.permutation(k)[:n_dead]] = 0.0
    return rng.standard_normal((rows, k)), x.T @ x


@settings(max_examples=60, deadline=None)
@given(
    pattern=nm_patterns,
    rows=st.integers(1, 9),
    groups=st.integers(1, 6),
    n=st.integers(1, 40),
    n_dead=st.integers(0, 3),
    blocksize=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_nm_guarantee(
    pattern: NMPattern, rows: int, groups: int, n: int, n_dead: int, blocksize: int, seed: int
) -> None:
    k = groups * pattern.group
    w, h = _random_problem(seed, rows, k, n, min(n_dead, k))
    out, keep = sparsegpt_with_mask(w, h, pattern, blocksize=blocksize)
    assert out.shape == w.shape and out.dtype == w.dtype
    assert np.isfinite(out).all()
    assert not out[~keep].any()
    assert not nm_violations(out, pattern).size
    assert (keep.reshape(-1, pattern.group).sum(axis=1) == pattern.keep).all()


@settings(max_examples=60, deadline=None)
@given(
    pattern=unstructured_patterns,
    rows=st.integers(1, 9),
    k=st.integers(1, 40),
    n=st.integers(1, 40),
    n_dead=st.integers(0, 3),
    blocksize=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_unstructured_exact_count(
    pattern: Unstructured, rows: int, k: int, n: int, n_dead: int, blocksize: int, seed: int
) -> None:
    w, h = _random_problem(seed, rows, k, n, min(n_dead, k))
    out, keep = sparsegpt_with_mask(w, h, pattern, blocksize=blocksize)
    assert np.isfinite(out).all()
    assert not out[~keep].any()
    s = pattern.sparsity
    if pattern.scope is Scope.LAYER:
        assert (~keep).sum() == int(rows * k * s)
    elif pattern.scope is Scope.OUTPUT:
        assert ((~keep).sum(axis=1) == int(k * s)).all()
    else:
        assert ((~keep).sum(axis=0) == int(rows * s)).all()
