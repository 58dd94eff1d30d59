"""Move a stored weight into the canonical ``(out, R, K)`` layout that the maths works on, and back."""

from __future__ import annotations

import numpy as np


def to_canonical(weight: np.ndarray, k_axis: int, out_axis: int) -> np.ndarray:
    """``(out, R, K)``: output neurons first, K last, every other axis (Conv kernel positions) flattened in R."""
    rest = [a for a in range(weight.ndim) if a not in (k_axis, out_axis)]
    moved = np.transpose(weight, [out_axis, *rest, k_axis])
    return moved.reshape(weight.shape[out_axis], -1, weight.shape[k_axis])


def from_canonical(canonical: np.ndarray, shape: tuple[int, ...], k_axis: int, out_axis: int) -> np.ndarray:
    """Inverse of :func:`to_canonical` for a weight of the given stored ``shape``."""
    rest = [a for a in range(len(shape)) if a not in (k_axis, out_axis)]
    order = [out_axis, *rest, k_axis]
    moved = canonical.reshape([shape[a] for a in order])
    return np.ascontiguousarray(np.transpose(moved, np.argsort(order)))
