"""Importance scores in the canonical ``(out, R, K)`` layout; every method feeds one masking code path."""

from __future__ import annotations

from enum import Enum

import numpy as np


def magnitude_scores(weight: np.ndarray) -> np.ndarray:
    """|W| as float32 (fp16 and bf16 values convert exactly, so their ties stay ties)."""
    return np.abs(weight.astype(np.float32, copy=False))


def wanda_scores(weight: np.ndarray, input_sumsq: np.ndarray, axis: int = -1) -> np.ndarray:
    """|W_ij| · ‖X_j‖₂: ``input_sumsq`` holds Σ x_j² per input channel j (``axis`` of ``weight``, K).

    A common scale of the statistics (rows seen, batch size) does not change the masks, so the sum is used as
    it is. Channels that never saw a non-zero value score zero; NaN or Inf statistics are treated as zero.
    """
    axis = axis % weight.ndim
    if input_sumsq.shape != (weight.shape[axis],):
        raise ValueError(f"statistics have shape {input_sumsq.shape}, weight has K={weight.shape[axis]}")
    norms = np.sqrt(np.nan_to_num(input_sumsq, nan=0.0, posinf=0.0, neginf=0.0).clip(min=0.0))
    along_k = [1] * weight.ndim
    along_k[axis] = -1
    return magnitude_scores(weight) * norms.astype(np.float32).reshape(along_k)


class Method(str, Enum):
    """How weights are ranked."""

    MAGNITUDE = "magnitude"  # |W|
    WANDA = "wanda"  # |W|·‖X‖, needs activation statistics
    SPARSEGPT = "sparsegpt"  # second-order, with weight reconstruction; needs Gram matrices
    ALPS = "alps"  # ADMM on the Gram matrix, then a least-squares refit of the kept weights; needs Gram matrices

    @property
    def reconstructs(self) -> bool:
        """Solves for new kept weights from the Gram matrices XᵀX (which calibration must then collect)."""
        return self in (Method.SPARSEGPT, Method.ALPS)
