"""Per-group scale search: the clip of each scale group's absmax that rounds its weights best.

Absmax scales (:func:`~graphprune.algorithms.quant_grid.grid_scales`: the group's extreme weight on the grid's
extreme code) spend the grid's few int4 levels on the group's single largest weight; shrinking the scale by
``s < 1`` clips that weight to the extreme code but rounds all the others on a finer grid. For each row and
scale group, every factor of ``shrinks`` is tried and the one whose rounding error is smallest is kept (``s = 1``
is always among them, so the chosen error is never above absmax's):

* ``"mse"``: the error is ``Σ (q - w)²`` over the group's weights (no calibration needed);
* ``"hessian"``: the error is ``e H_g eᵀ`` with ``H_g`` the group's diagonal block of the Gram matrix ``Σ xᵀx``,
  the group's share of the layer output's squared error when the other groups are exact (the cross terms
  between groups are left out: they would couple every group's choice).

Zero weights (pruned ones included) have code 0 on every scale and add no error, so the search never moves a
pruned zero. The scales come back as float32, the form the grid and the written file use.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from graphprune.algorithms.quant_grid import QuantGrid, grid_scales, quantize_codes

ClipMode = Literal["none", "mse", "hessian"]
CLIP_MODES: tuple[ClipMode, ...] = ("none", "mse", "hessian")
# 1.0 down to 0.6 in steps of 0.025: int4's best clip is usually 0.8-0.95 of the absmax.
SHRINKS = tuple(1.0 - 0.025 * i for i in range(17))


def searched_scales(
    w: np.ndarray,
    grid: QuantGrid,
    mode: ClipMode,
    hessian: np.ndarray | None = None,
    shrinks: tuple[float, ...] = SHRINKS,
) -> np.ndarray:
    """Float32 scales ``(out, n_blocks)`` of ``w`` ``(out, K)``: absmax (``mode="none"``) or the best clip of it.

    ``hessian`` ``(K, K)`` is needed for ``mode="hessian"`` (its blocks along K are the grid's scale blocks).
    """
    if mode not in CLIP_MODES:
        raise ValueError(f"clip mode must be one of {CLIP_MODES}, got {mode!r}")
    absmax = grid_scales(w, grid)
    if mode == "none" or w.size == 0:
        return absmax
    if mode == "hessian" and (hessian is None or hessian.shape != (w.shape[1], w.shape[1])):
        raise ValueError(f"the hessian clip needs a ({w.shape[1]}, {w.shape[1]}) Gram matrix")
    w64 = np.asarray(w, dtype=np.float64)
    best_scales = absmax.copy()
    best_error = np.full(absmax.shape, np.inf)
    for shrink in sorted(shrinks, reverse=True):  # 1.0 first: ties keep the larger, unclipped scale
        scales = (absmax * np.float32(shrink)).astype(np.float32) if shrink != 1.0 else absmax
        scales = np.where(scales > 0, scales, absmax)  # an underflowing shrink keeps absmax's positive scale
        error = _group_errors(w64, scales, grid, mode, hessian)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_scales = np.where(better, scales, best_scales)
    return best_scales.astype(np.float32)


def _group_errors(
    w: np.ndarray, scales: np.ndarray, grid: QuantGrid, mode: ClipMode, hessian: np.ndarray | None
) -> np.ndarray:
    """The rounding error of every (row, scale group) of ``w`` on ``scales``: ``(out, n_blocks)``."""
    k = w.shape[1]
    expanded = scales[:, grid.scale_columns(k)].astype(np.float64)
    e = quantize_codes(w, scales, grid).astype(np.float64) * expanded - w
    size = grid.block_size or k
    errors = np.empty(scales.shape)
    for b, start in enumerate(range(0, k, size)):
        span = slice(start, min(start + size, k))
        eb = e[:, span]
        if mode == "mse":
            errors[:, b] = np.einsum("rk,rk->r", eb, eb)
        else:
            errors[:, b] = np.einsum("rk,rk->r", eb @ np.asarray(hessian)[span, span], eb)
    return errors
