"""Weight quantization grids with zero point 0 (int8, int4, fp8 E4M3) on the canonical ``(out, K)`` layout.

One grid serves the rounding solvers (round to nearest, GPTQ, the joint prune-and-quantize mode) and the graph
side that writes the codes as ONNX ``DequantizeLinear`` initializers, so both agree on every code and scale:

1. scales: one per output row, or one per block of ``block_size`` consecutive weights along K (the last block
   of a row may be shorter, as ONNX's blocked ``DequantizeLinear`` allows), in float32, with **zero point 0**, so
   a zero weight has code 0 and every pruned weight stays exactly zero on any grid:
   * int8, fp8: ``scale = absmax / qmax`` (127, 448), symmetric;
   * int4: ``scale = max(maxpos / 7, maxneg / 8)`` with ``maxpos``/``maxneg`` the largest positive weight and
     the largest negative one's magnitude: ONNX's INT4 holds -8..7, and a group whose extreme weight is
     negative spends the extra level -8 on it, a grid 8/7 finer than ``absmax / 7`` (a group whose extreme is
     positive gets ``absmax / 7``, as before). Measured (BENCHMARKS.md, "int4 g128 on all 210 weights"): a
     layer error 9-10% below the symmetric -7..7 grid's, for round to nearest, clipped scales and GPTQ alike;
     on SmolLM2 at g128, round to nearest's perplexity 26% lower, GPTQ's unchanged (+0.5%).
   A row or block whose weights are all zero (or so small that the scale underflows) gets scale 1.0: its
   codes are 0 and it dequantizes to 0, and no division by zero can happen downstream.
2. codes: ``w / scale`` (computed in the weight's precision: float32 weights in float32, as ONNX Runtime's
   ``QuantizeLinear``), then
   * int8, int4: round half to even (ONNX ``QuantizeLinear``'s rule) and saturate to ``[qmin, qmax]``
     (-127..127, -8..7). Both are held in int8; int4 codes are ONNX's INT4, whose DequantizeLinear reads them
     unchanged. int8 stays symmetric (TensorRT's int8 weights); ONNX's QuantizeLinear would saturate to -128
     instead; with scales from :func:`grid_scales` of the same weights no code goes past ``[qmin, qmax]``, so
     the two agree exactly there, and a solver that moves weights past the extremes (GPTQ updates later
     columns) saturates to the same range.
   * fp8: saturate to ±448 (E4M3FN's largest finite value, ONNX's ``saturate=1``), then round to nearest even
     in E4M3FN (``ml_dtypes.float8_e4m3fn``).
3. dequantization: ``code · scale`` in float32, as ONNX ``DequantizeLinear``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import ml_dtypes
import numpy as np

Precision = Literal["int8", "int4", "fp8"]
_QMAX: dict[str, float] = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}
_QMIN: dict[str, float] = {"int8": -127.0, "int4": -8.0, "fp8": -448.0}
_FP8 = np.dtype(ml_dtypes.float8_e4m3fn)


@dataclass(frozen=True, kw_only=True)
class QuantGrid:
    """A symmetric grid: ``precision`` and the scale granularity (None: one scale per output row; else one per
    block of ``block_size`` weights along K)."""

    precision: Literal["int8", "int4", "fp8"]
    block_size: int | None = None

    def __post_init__(self) -> None:
        if self.precision not in _QMAX:
            raise ValueError(f"precision must be one of {sorted(_QMAX)}, got {self.precision!r}")
        if self.block_size is not None and (isinstance(self.block_size, bool) or self.block_size < 1):
            raise ValueError(f"block_size must be a positive integer or None, got {self.block_size!r}")

    @property
    def qmax(self) -> float:
        """The largest code magnitude: 127, 7 or 448.0."""
        return _QMAX[self.precision]

    @property
    def qmin(self) -> float:
        """The most negative code: -127, -8 or -448.0."""
        return _QMIN[self.precision]

    @property
    def code_dtype(self) -> np.dtype:
        """int8 for int8 and int4 (int4 codes held one per byte), float8_e4m3fn for fp8."""
        return _FP8 if self.precision == "fp8" else np.dtype(np.int8)

    def to_dict(self) -> dict[str, str | int | None]:
        """The grid as a report records it."""
        return {"precision": self.precision, "block_size": self.block_size}

    def n_blocks(self, k: int) -> int:
        """Scales per row for a reduction axis of length ``k``."""
        if self.block_size is None:
            return 1
        return max(1, -(-k // self.block_size))

    def scale_columns(self, k: int) -> np.ndarray:
        """For each of the ``k`` columns, the index of its scale block (int64 ``(k,)``)."""
        if self.block_size is None:
            return np.zeros(k, dtype=np.int64)
        return np.arange(k, dtype=np.int64) // self.block_size


def grid_scales(w: np.ndarray, grid: QuantGrid) -> np.ndarray:
    """Scales of ``w`` ``(out, K)`` (module docstring, step 1): float32 ``(out, n_blocks)``, every one positive.

    ``max(maxpos / qmax, maxneg / -qmin)``: for the symmetric grids (int8, fp8) that is ``absmax / qmax``
    exactly, since rounding a quotient is monotonic."""
    w = _check_weight(w).astype(np.float32, copy=False)
    positive = _group_max(np.maximum(w, 0), grid) / np.float32(grid.qmax)
    negative = _group_max(np.maximum(-w, 0), grid) / np.float32(-grid.qmin)
    return _positive(np.maximum(positive, negative))


def _group_max(a: np.ndarray, grid: QuantGrid) -> np.ndarray:
    """The maximum of non-negative ``a`` ``(out, K)`` per row or per block along K: ``(out, n_blocks)``."""
    rows, k = a.shape
    if k == 0:
        return np.zeros((rows, grid.n_blocks(k)), dtype=np.float32)
    if grid.block_size is None:
        return a.max(axis=1, keepdims=True)
    return np.maximum.reduceat(a, np.arange(0, k, grid.block_size), axis=1)


def quantize_codes(w: np.ndarray, scales: np.ndarray, grid: QuantGrid) -> np.ndarray:
    """Codes of ``w`` ``(out, K)`` on ``grid`` with ``scales`` ``(out, n_blocks)``: int8 (int8 and int4 codes) or
    float8_e4m3fn; round half to even, saturated to ``[qmin, qmax]`` (module docstring, step 2)."""
    w = _check_weight(w)
    ratio = w / _expand(scales, w.shape, grid).astype(w.dtype, copy=False)
    if grid.precision == "fp8":
        # Saturate before the cast: ml_dtypes turns out-of-range values into NaN (E4M3FN has no infinity).
        return np.clip(ratio, grid.qmin, grid.qmax).astype(np.float32).astype(_FP8)
    return np.clip(np.rint(ratio), grid.qmin, grid.qmax).astype(np.int8)


def dequantize_codes(codes: np.ndarray, scales: np.ndarray, grid: QuantGrid) -> np.ndarray:
    """``codes · scales`` as float32 ``(out, K)``: what ONNX ``DequantizeLinear`` computes."""
    if codes.ndim != 2:
        raise ValueError(f"codes must be (out, K), got shape {codes.shape}")
    return codes.astype(np.float32) * _expand(scales, codes.shape, grid)


def fake_quantize(w: np.ndarray, grid: QuantGrid) -> np.ndarray:
    """Round to nearest on ``grid`` with absmax scales, dequantized (float32): the RTN baseline."""
    scales = grid_scales(w, grid)
    return dequantize_codes(quantize_codes(w, scales, grid), scales, grid)


def _check_weight(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"weight must be (out, K), got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.floating):
        w = w.astype(np.float32)
    if w.dtype not in (np.float32, np.float64):
        w = w.astype(np.float32)
    return w


def _positive(scales: np.ndarray) -> np.ndarray:
    scales = np.asarray(scales, dtype=np.float32)
    return np.where(scales > 0, scales, np.float32(1.0)).astype(np.float32)


def _expand(scales: np.ndarray, shape: tuple[int, ...], grid: QuantGrid) -> np.ndarray:
    """``scales`` ``(out, n_blocks)`` broadcast to one scale per weight ``(out, K)``."""
    rows, k = shape
    scales = np.asarray(scales, dtype=np.float32)
    if scales.shape != (rows, grid.n_blocks(k)):
        raise ValueError(
            f"scales must be ({rows}, {grid.n_blocks(k)}) for weight {tuple(shape)}, got {scales.shape}"
        )
    return scales[:, grid.scale_columns(k)]
