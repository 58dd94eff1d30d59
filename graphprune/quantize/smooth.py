"""SmoothQuant: move activation outliers into the weights, exactly, before quantizing both.

For an activation ``x`` read by the consumers W_1..W_n (each ``(out, K)``), with a = alpha:
s_j = max|x_j|^a / max|W_j|^(1-a), max|W_j| taken over every consumer's column j (Xiao et al. 2023,
``smoothquant/smooth.py``). Then x' = x / s is folded into ``x``'s producer, where the channel-coupling engine
proves it exact (:func:`graphprune.graph.scale_folds.scale_fold`: a norm's weight and bias, the producing weights'
output columns, V's columns through the attention heads), and each consumer's K row j is multiplied by s_j:
x' W' = x W, so the float model computes the same function. Scaling a K row keeps its zeros zero, so N:M
survives. The calibrated range of x' is x's per-channel range divided by s: no second calibration run.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphprune.algorithms.layout import to_canonical
from graphprune.graph.scale_folds import ScaleFold, fold_scale, scale_fold
from graphprune.graph.stored import read_array, stored_tensor
from graphprune.graph.targets import Target
from graphprune.quantize.ranges import ChannelRange

_S_RANGE = (1e-5, 1e5)  # scales outside this would trade one overflow for another


@dataclass(frozen=True)
class SmoothRecord:
    activation: str
    consumers: tuple[str, ...]  # weight names
    fold: str  # where x / s went, or why nothing was done
    smoothed: bool
    scale_min: float = 1.0
    scale_max: float = 1.0


def smoothing_scales(x_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's per-channel scales; 1 where either side is zero (nothing to balance)."""
    x = np.asarray(x_absmax, np.float64)
    w = np.asarray(w_absmax, np.float64)
    ok = (x > 0) & (w > 0)
    s = np.ones_like(x)
    s[ok] = np.power(x[ok], alpha) / np.power(w[ok], 1.0 - alpha)
    return np.clip(s, *_S_RANGE)


def smooth(
    model: ir.Model, targets: Sequence[Target], ranges: MutableMapping[str, ChannelRange], alpha: float
) -> tuple[list[SmoothRecord], dict[str, np.ndarray]]:
    """Smooth every activation that feeds only quantized weights and whose producer can take the scales.

    ``ranges`` is updated to the smoothed activations' ranges. Returns the records and, per smoothed activation,
    its scales ``s`` (the activation is now ``x / s``).
    """

    def scales(activation: str, group: Sequence[Target], weights: Sequence[ir.Value]) -> np.ndarray:
        w_absmax = np.max([_column_absmax(w, t) for w, t in zip(weights, group, strict=True)], axis=0)
        s = smoothing_scales(ranges[activation].absmax, w_absmax, alpha)
        ranges[activation] = ranges[activation].scaled(s)
        return s

    return fold_groups(model, targets, scales)


ChooseScales = Callable[[str, Sequence[Target], Sequence[ir.Value]], np.ndarray]


def fold_groups(
    model: ir.Model, targets: Sequence[Target], choose: ChooseScales
) -> tuple[list[SmoothRecord], dict[str, np.ndarray]]:
    """For every activation that feeds only ``targets``' MatMuls and has an exact fold point, ``choose(activation,
    its targets, their stored weights)`` gives the scales ``s``; ``x / s`` is folded into the producer and every
    consumer's K rows are multiplied by ``s``. Returns the records and the scales per activation folded."""
    graph = model.graph
    readers: dict[str, list[Target]] = {}
    for t in targets:
        readers.setdefault(t.consumers[0].activation, []).append(t)
    values = {str(v.name): v for node in graph for v in node.outputs}
    records = []
    scales: dict[str, np.ndarray] = {}
    for activation, group in readers.items():
        names = tuple(t.name for t in group)
        x = values.get(activation)
        reason = _unsmoothable(x, group, graph)
        fold = scale_fold(x) if x is not None and not reason else None
        if fold is None:
            why = reason or "no exact fold point: what writes it has no per-channel parameter the scales can enter"
            records.append(SmoothRecord(activation, names, why, False))
            continue
        s = choose(activation, group, [graph.initializers[t.name] for t in group])
        fold_scale(fold, 1.0 / s)  # the producer's side times 1/s, every consumer's K rows times s
        scales[activation] = s
        records.append(SmoothRecord(activation, names, _describe(fold), True, float(s.min()), float(s.max())))
    return records, scales


def _unsmoothable(x: ir.Value | None, group: Sequence[Target], graph: ir.Graph) -> str:
    if x is None:
        return "a graph input (nothing writes it)"
    if x.is_graph_output():
        return "also a graph output"
    quantized = {t.name for t in group}
    for use in x.uses():
        w = use.node.inputs[1] if len(use.node.inputs) > 1 else None
        if use.idx != 0 or use.node.op_type != "MatMul" or w is None or str(w.name) not in quantized:
            return f"also read by {use.node.op_type} {use.node.name}, which would see the scaled values"
    if any(c.op != "MatMul" for t in group for c in t.consumers):
        return "only MatMul consumers are smoothed"
    return ""


def _column_absmax(weight: ir.Value, target: Target) -> np.ndarray:
    """max |W| per input channel (K) of a stored weight."""
    canonical = to_canonical(read_array(stored_tensor(weight)), target.k_axis, target.out_axis)
    return np.abs(canonical).max(axis=(0, 1))


def _describe(fold: ScaleFold) -> str:
    """Where x / s went: "norm: <node>" or "weight: <node>, ..." (the fold's scaled tensors' nodes)."""
    nodes = dict.fromkeys(str(slot.node.name or slot.node.op_type) for slot in fold.scaled)
    return f"{fold.kind}: {', '.join(nodes)}"
