"""Activation ranges for static scales and smoothing, reduced inside ONNX Runtime: running min/max per channel.

One tap per activation tensor that a quantized weight multiplies: the tensor, moved channel-last and seen as
``[rows, K]``, reduced to its minimum and maximum per channel (ReduceMin/ReduceMax over the rows). Only those two
K-vectors per batch are fetched, never the activations (ONNX Runtime's calibrators keep every intermediate tensor
of every batch); the running min/max across batches is kept in float64. Per-tensor ranges (static scales) and
per-channel max|x| (SmoothQuant) both come from these vectors, and stay exact under a per-channel rescaling of the
tensor (x / s has per-channel range lo / s, hi / s), so one calibration serves smoothing and quantization.
Taps are built and cut like the weight taps (:mod:`graphprune.calibration.taps`): the graph ends at the last
tapped tensor, the weights reach ONNX Runtime without a copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphprune.calibration.providers import resolve_providers
from graphprune.calibration.request import CalibrationRequest
from graphprune.calibration.session import Session, values_by_name
from graphprune.calibration.taps import TapBuilder, TapPlan, connected, tapped_model
from graphprune.errors import GraphpruneError


@dataclass(frozen=True)
class RangeTap:
    """An activation to measure: channel axis (negative), width, and rank when the axis is not the last."""

    value: str
    axis: int
    width: int
    rank: int | None = None


@dataclass
class ChannelRange:
    """Running per-channel minimum and maximum of one activation tensor (float64), and the rows seen."""

    lo: np.ndarray
    hi: np.ndarray
    rows: int = 0

    @property
    def absmax(self) -> np.ndarray:
        """max |x| per channel: what SmoothQuant balances against the weights."""
        return np.maximum(np.abs(self.lo), np.abs(self.hi))

    def scaled(self, s: np.ndarray) -> ChannelRange:
        """The range of ``x / s`` (``s`` > 0 per channel): smoothing's effect, known without another run."""
        return ChannelRange(self.lo / s, self.hi / s, self.rows)

    def tensor_range(self) -> tuple[float, float]:
        return float(self.lo.min()), float(self.hi.max())


def _reduce(b: TapBuilder, op: str, x: ir.Value, axes: list[int]) -> ir.Value:
    """ReduceMin/ReduceMax over ``axes``: an input from opset 18, an attribute before."""
    if b.opset >= 18:
        return b.node(op, [x, b.const(axes, "axes")], op.lower(), keepdims=0)
    return b.node(op, [x], op.lower(), axes=axes, keepdims=0)


@contextmanager
def _range_taps(model: ir.Model, taps: Sequence[RangeTap]) -> Iterator[tuple[TapPlan, list[str]]]:
    """Per tap the names of its min, max and size outputs (connected to the model inside the block)."""
    values = values_by_name(model.graph)
    b = TapBuilder(model, values, TapPlan(taps=[]))
    names: list[str] = []
    with connected(b.plan) as plan:
        for tap in taps:
            b.anchor = values[tap.value]
            x = values[tap.value]
            if x.dtype != ir.DataType.FLOAT:  # fp16/bf16 activations: compare in float32
                x = b.node("Cast", [x], "float32", to=ir.DataType.FLOAT.value)
            if tap.axis != -1:
                if tap.rank is None:
                    raise GraphpruneError(f"tensor {tap.value}: unknown rank, cannot reduce its channel axis")
                c = tap.rank + tap.axis
                x = b.node("Transpose", [x], "channel_last", perm=[i for i in range(tap.rank) if i != c] + [c])
            rows = b.reshape(x, [-1, tap.width])
            for value, dtype, shape in (
                (_reduce(b, "ReduceMin", rows, [0]), ir.DataType.FLOAT, [tap.width]),
                (_reduce(b, "ReduceMax", rows, [0]), ir.DataType.FLOAT, [tap.width]),
                (b.node("Size", [rows], "size"), ir.DataType.INT64, []),
            ):
                b.output(value, dtype, shape)
                names.append(str(value.name))
        yield plan, names


def collect_ranges(
    model: ir.Model,
    taps: Sequence[RangeTap],
    request: CalibrationRequest,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[dict[str, ChannelRange], list[str]]:
    """Per-channel running min/max of every tapped tensor over ``request``'s data, and the data's warnings."""
    if not taps:
        return {}, []
    feeds = request.open(model)
    with _range_taps(model, taps) as (plan, names):
        session = Session(tapped_model(model, plan), resolve_providers(request.provider), request.optimize)
    ranges = {t.value: ChannelRange(np.full(t.width, np.inf), np.full(t.width, -np.inf)) for t in taps}
    seen = 0
    for label, feed in feeds:
        results = session.run(names, feed, label)
        for i, tap in enumerate(taps):
            lo, hi, size = results[3 * i : 3 * i + 3]
            r = ranges[tap.value]
            np.minimum(r.lo, lo.astype(np.float64), out=r.lo)
            np.maximum(r.hi, hi.astype(np.float64), out=r.hi)
            r.rows += int(size) // tap.width
        seen += 1
        if on_batch:
            on_batch(seen)
    if not seen:
        raise GraphpruneError("the calibration data is empty")
    warnings = list(feeds.source.warnings)
    for name, r in ranges.items():
        if not (np.isfinite(r.lo).all() and np.isfinite(r.hi).all()):
            warnings.append(f"activation {name}: NaN or Inf values in the calibration run; its range is unusable")
    return ranges, warnings
