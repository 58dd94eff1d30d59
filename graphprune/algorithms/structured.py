"""Structured importance: score whole units (neurons, heads, filters), choose which go, and FLAP's compensation.

Pure numpy. A consumer weight is given channel-first as ``(C, out, R)``: C the channels the group removes (the
consumer's K), ``out`` its output neurons, R any kernel positions. A producer weight is ``(C, rest)``: its output
channels first. A unit is ``C / units`` consecutive channels (1 for a neuron or a filter, head_dim for a head).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum

import numpy as np


class StructuredMethod(str, Enum):
    """How units are ranked."""

    L2 = "l2"  # ‖weights of the unit‖₂ over every coupled tensor, no data
    WANDA = "wanda"  # Σ over the unit of |W|·‖X‖ (Wanda-sp), needs calibration
    FLAP = "flap"  # Σ over the unit of Var(X)·‖W_:,j‖², plus bias compensation, needs calibration
    OBS = "obs"  # the error the least-squares refit leaves without the unit (algorithms/refit.py), needs data


def unit_sum(per_channel: np.ndarray, units: int) -> np.ndarray:
    """Sum consecutive channels into ``units`` equal units."""
    if per_channel.shape[0] % units:
        raise ValueError(f"{per_channel.shape[0]} channels do not split into {units} units")
    return per_channel.reshape(units, -1).sum(axis=1)


def _rows_sumsq(matrix: np.ndarray) -> np.ndarray:
    flat = matrix.reshape(matrix.shape[0], -1).astype(np.float64)
    return np.einsum("ij,ij->i", flat, flat)


def l2_scores(tensors: Sequence[np.ndarray], units: int) -> np.ndarray:
    """Group L2 norm per unit: √(Σ of every squared weight the unit owns, over producers and consumers).

    With one producer this is PyTorch's ``ln_structured(n=2, dim=0)`` on it; the coupled tensors add the
    weights the unit also removes (DepGraph's group norm).
    """
    total = np.zeros(units, dtype=np.float64)
    for t in tensors:
        total += unit_sum(_rows_sumsq(t), units)
    return np.sqrt(total)


def wanda_scores(consumers: Sequence[np.ndarray], input_sumsq: Sequence[np.ndarray], units: int) -> np.ndarray:
    """Wanda-sp: Σ over the unit's channels j and the consumers' outputs i of |W_ij|·‖X_j‖₂."""
    total = np.zeros(units, dtype=np.float64)
    for w, sumsq in zip(consumers, input_sumsq, strict=True):
        norms = np.sqrt(np.nan_to_num(np.asarray(sumsq, dtype=np.float64)).clip(min=0.0))
        column = np.abs(w.reshape(w.shape[0], -1).astype(np.float64)).sum(axis=1)
        total += unit_sum(column * norms, units)
    return total


def flap_scores(consumers: Sequence[np.ndarray], input_variance: Sequence[np.ndarray], units: int) -> np.ndarray:
    """FLAP's fluctuation metric: Σ over the unit's channels j of Var(X_j)·‖W_:,j‖²."""
    total = np.zeros(units, dtype=np.float64)
    for w, var in zip(consumers, input_variance, strict=True):
        total += unit_sum(np.nan_to_num(np.asarray(var, dtype=np.float64)).clip(min=0.0) * _rows_sumsq(w), units)
    return total


def channel_moments(sums: np.ndarray, sumsq: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (population) variance per channel from Σx, Σx² and the number of rows."""
    if rows <= 0:
        raise ValueError("no calibration rows were seen")
    mean = np.asarray(sums, dtype=np.float64) / rows
    var = np.asarray(sumsq, dtype=np.float64) / rows - mean * mean
    return mean, var.clip(min=0.0)


def removal_count(units: int, ratio: float, multiple: int = 1) -> int:
    """How many of ``units`` a ratio removes: the nearest whole number. With ``multiple``, the units left are
    rounded to the nearest multiple of it instead (at least one multiple: groups that small stay whole), for
    kernels that work on blocks of channels."""
    count = int(np.floor(ratio * units + 0.5))
    if multiple <= 1 or count == 0:
        return count
    left = max(multiple, multiple * int(np.floor((units - count) / multiple + 0.5)))
    return max(units - left, 0)


def unit_multiple(round_to: int, unit_size: int) -> int:
    """The units a group must keep a multiple of so that its channels (units x ``unit_size``) are a multiple of
    ``round_to``: ``round_to`` neurons or filters, but any number of heads whose head_dim it already divides."""
    return round_to // math.gcd(round_to, unit_size)


def units_to_remove(scores: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` lowest-scoring units, ascending; on equal scores the later unit goes (the earlier is kept)."""
    n = scores.shape[0]
    if not 0 <= count < n:
        raise ValueError(f"cannot remove {count} of {n} units")
    order = np.lexsort((-np.arange(n), np.nan_to_num(scores, nan=-np.inf)))
    return np.sort(order[:count])


def channels_of_units(unit_indices: np.ndarray, unit_size: int) -> np.ndarray:
    """Channel indices covered by the given units of ``unit_size`` consecutive channels."""
    return (np.asarray(unit_indices)[:, None] * unit_size + np.arange(unit_size)[None, :]).reshape(-1)


def flap_bias(consumer: np.ndarray, mean: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """The mean contribution of the removed input channels to each output: Σ_{j removed} μ_j · Σ_R W[j, i, R].

    Added to the consumer's bias, it replaces what those channels gave on average (FLAP's compensation).
    """
    w = consumer[removed].astype(np.float64)
    return np.einsum("j,jir->i", np.asarray(mean, dtype=np.float64)[removed], w.reshape(*w.shape[:2], -1))


def block_influence(dot: np.ndarray, norm_in: np.ndarray, norm_out: np.ndarray) -> float:
    """ShortGPT's block influence: mean over tokens of 1 - cos(block input, block output).

    ``dot``, ``norm_in``, ``norm_out``: per token ⟨x, y⟩, ‖x‖², ‖y‖².
    """
    denom = np.sqrt(np.asarray(norm_in, dtype=np.float64) * np.asarray(norm_out, dtype=np.float64))
    cos = np.divide(dot, denom, out=np.ones_like(denom), where=denom > 0)
    return float(np.mean(1.0 - cos))
