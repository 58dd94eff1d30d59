"""Symmetric quantization grids on the canonical ``(out, K)`` layout (interim copy until the gptq branch lands).

Zero maps to zero on every grid, so a pruned weight stays exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import ml_dtypes
import numpy as np

_QMAX = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}


@dataclass(frozen=True, kw_only=True)
class QuantGrid:
    precision: Literal["int8", "int4", "fp8"]
    block_size: int | None = None  # None: one scale per output row


def _blocks(w: np.ndarray, grid: QuantGrid) -> np.ndarray:
    out, k = w.shape
    b = grid.block_size or k
    pad = (-k) % b
    padded = np.pad(w, ((0, 0), (0, pad))) if pad else w
    return padded.reshape(out, -1, b)


def grid_scales(w: np.ndarray, grid: QuantGrid) -> np.ndarray:
    absmax = np.abs(_blocks(np.asarray(w, np.float32), grid)).max(axis=2)
    scales = (absmax / _QMAX[grid.precision]).astype(np.float32)
    return np.where(scales > 0, scales, np.float32(1.0)).astype(np.float32)


def _expand(scales: np.ndarray, k: int, grid: QuantGrid) -> np.ndarray:
    return np.repeat(scales, grid.block_size or k, axis=1)[:, :k]


def quantize_codes(w: np.ndarray, scales: np.ndarray, grid: QuantGrid) -> np.ndarray:
    x = np.asarray(w, np.float32) / _expand(scales, w.shape[1], grid)
    q = _QMAX[grid.precision]
    if grid.precision == "fp8":
        return np.clip(x, -q, q).astype(ml_dtypes.float8_e4m3fn)
    return np.clip(np.rint(x), -q, q).astype(np.int8)


def dequantize_codes(codes: np.ndarray, scales: np.ndarray, grid: QuantGrid) -> np.ndarray:
    return codes.astype(np.float32) * _expand(scales, codes.shape[1], grid)
