"""Per-group clip search (scales), against a brute-force reference; GPTQ with activation order, static groups and
the clip, against round to nearest with the same scales and its layer objective tr(ΔW H ΔWᵀ)."""

from __future__ import annotations

import numpy as np
import pytest

from graphprune.algorithms.clip_search import SHRINKS, searched_scales
from graphprune.algorithms.gptq import gptq_quantize
from graphprune.algorithms.masks import nm_violations
from graphprune.algorithms.pattern import NMPattern
from graphprune.algorithms.quant_grid import QuantGrid, dequantize_codes, grid_scales, quantize_codes
from tests.gram_data import correlated_layer, random_nm_keep


def reference_clip(w: np.ndarray, block: int, gram: np.ndarray | None) -> np.ndarray:
    """Row by row, group by group: every shrink of the absmax scale, the smallest rounding error (first wins)."""
    rows, k = w.shape
    out = np.zeros((rows, -(-k // block)), dtype=np.float32)
    for r in range(rows):
        for b, start in enumerate(range(0, k, block)):
            g = w[r, start : start + block].astype(np.float64)
            # int4's base scale: the largest positive weight on 7, the largest negative magnitude on -8
            absmax = max(
                np.float32(max(g.max(), 0.0)) / np.float32(7.0), np.float32(max(-g.min(), 0.0)) / np.float32(8.0)
            )
            absmax = absmax if absmax > 0 else np.float32(1.0)
            best, best_err = absmax, np.inf
            for shrink in SHRINKS:
                s = np.float32(absmax * np.float32(shrink))
                e = np.clip(np.rint(g / np.float64(s)), -8, 7) * np.float64(s) - g
                err = e @ e if gram is None else e @ gram[start : start + block, start : start + block] @ e
                if err < best_err:
                    best, best_err = s, err
            out[r, b] = best
    return out


def objective(w: np.ndarray, w_hat: np.ndarray, gram: np.ndarray) -> float:
    """The layer objective tr(ΔW H ΔWᵀ)."""
    d = (w_hat - w).astype(np.float64)
    return float(np.trace(d @ gram @ d.T))


@pytest.mark.parametrize("mode", ["mse", "hessian"])
def test_clip_matches_brute_force_and_never_loses(mode: str) -> None:
    w, gram = correlated_layer(31, rows=8, k=40)  # 40: the last group of 16 is shorter
    grid = QuantGrid(precision="int4", block_size=16)
    scales = searched_scales(w, grid, mode, gram if mode == "hessian" else None)  # type: ignore[arg-type]
    np.testing.assert_array_equal(scales, reference_clip(w, 16, gram if mode == "hessian" else None))
    assert np.any(scales < grid_scales(w, grid))  # some group is clipped
    for s in (scales, grid_scales(w, grid)):  # the searched scales round at least as well, group by group
        assert s.dtype == np.float32
    e_clip = dequantize_codes(quantize_codes(w, scales, grid), scales, grid) - w
    e_rtn = dequantize_codes(quantize_codes(w, grid_scales(w, grid), grid), grid_scales(w, grid), grid) - w
    if mode == "mse":
        assert np.all((e_clip**2).reshape(8, -1).sum(1) <= (e_rtn**2).reshape(8, -1).sum(1) + 1e-9)


def test_clip_keeps_zeros_and_none_is_absmax() -> None:
    w, gram = correlated_layer(32, rows=8, k=32)
    keep = random_nm_keep(w, NMPattern(2, 4), 1)
    pruned = np.where(keep, w, 0.0).astype(np.float32)
    grid = QuantGrid(precision="int4", block_size=8)
    np.testing.assert_array_equal(searched_scales(pruned, grid, "none"), grid_scales(pruned, grid))
    scales = searched_scales(pruned, grid, "hessian", gram)
    codes = quantize_codes(pruned, scales, grid)
    assert np.all(codes[~keep] == 0) and nm_violations(codes.astype(np.float32), NMPattern(2, 4)).size == 0
    with pytest.raises(ValueError, match="Gram matrix"):
        searched_scales(pruned, grid, "hessian")
    with pytest.raises(ValueError, match="clip mode"):
        searched_scales(pruned, grid, "minmax")  # type: ignore[arg-type]


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("clip", ["none", "mse", "hessian"])
def test_gptq_with_identity_hessian_is_round_to_nearest_on_the_same_scales(act_order: bool, clip: str) -> None:
    # H = I: no weight's rounding changes another's best value, so GPTQ (any order) rounds to nearest, and its
    # scales, static or found as the sweep reaches each group, are the clip of the original weights.
    w, _ = correlated_layer(33, rows=10, k=48)
    keep = random_nm_keep(w, NMPattern(2, 4), 4)
    pruned = np.where(keep, w, 0.0).astype(np.float32)
    eye = np.eye(w.shape[1])
    grid = QuantGrid(precision="int4", block_size=16)
    codes, scales = gptq_quantize(pruned, eye, grid, keep=keep, act_order=act_order, clip=clip, blocksize=32)  # type: ignore[arg-type]
    expected = searched_scales(pruned, grid, clip, eye)  # type: ignore[arg-type]
    np.testing.assert_array_equal(scales, expected)
    np.testing.assert_array_equal(codes, quantize_codes(pruned, expected, grid))


@pytest.mark.parametrize("clip", ["none", "hessian"])
def test_gptq_objective_below_round_to_nearest_under_the_mask(clip: str) -> None:
    # On the same static scales (activation order's static groups) GPTQ's tr(ΔW H ΔWᵀ) is below round to
    # nearest's over many layers; every pruned weight is exactly zero afterwards and 2:4 holds. GPTQ is greedy,
    # so a single layer may lose: 4 of 600 seeds of this generator by up to 6.5%, hence the sum over layers.
    # (Without activation order the scales of a group come from weights the sweep has moved, and GPTQ under a
    # 2:4 mask loses more often: seed 1 of correlated_layer by 5%.)
    grid = QuantGrid(precision="int4", block_size=16)
    gptq_total = rtn_total = 0.0
    for seed in range(24):
        w, gram = correlated_layer(seed, rows=12, k=64)
        keep = random_nm_keep(w, NMPattern(2, 4), seed % 7)
        pruned = np.where(keep, w, 0.0).astype(np.float32)
        codes, scales = gptq_quantize(pruned, gram, grid, keep=keep, act_order=True, clip=clip)  # type: ignore[arg-type]
        w_hat = dequantize_codes(codes, scales, grid)
        rtn_scales = searched_scales(pruned, grid, clip, gram)  # type: ignore[arg-type]
        rtn = dequantize_codes(quantize_codes(pruned, rtn_scales, grid), rtn_scales, grid)
        gptq_total += objective(pruned, w_hat, gram)
        rtn_total += objective(pruned, rtn, gram)
        assert np.all(w_hat[~keep] == 0) and nm_violations(w_hat, NMPattern(2, 4)).size == 0
        np.testing.assert_array_equal(scales, rtn_scales)  # static groups: fixed from the original weights
    assert gptq_total < 0.9 * rtn_total
