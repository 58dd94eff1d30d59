"""Clipped activation ranges for static scales, chosen inside ONNX Runtime: MSE-optimal or percentile thresholds.

A per-tensor min/max scale spends the grid on the few largest values; clipping them can lower the error of the
many small ones. Per activation tensor, a fixed grid of candidate thresholds ``t_k = f_k · max|x|`` with
``f_k = 2^(-k/4)``, k = 0..23 (``f_0 = 1`` is the min/max range itself, the smallest is 1/53 of it), ``max|x|``
from the min/max calibration (after smoothing). Candidate k quantizes the range ``[max(lo, -t_k), min(hi, t_k)]``
with the very grid the quantized model uses (:func:`graphprune.quantize.passes.activation_grid`), so a clip never
widens a range. One more calibration run, on the model as it will be quantized (smoothed, still float), scores
every candidate on every batch in the graph and fetches only ``K`` numbers per tensor:

- ``mse``: Σ (DequantizeLinear(QuantizeLinear(x)) - x)² per candidate, with ONNX's own QuantizeLinear and
  DequantizeLinear (per axis over the candidates: the rounding and saturation the deployed model applies);
- ``percentile``: #{|x| > t_k} per candidate, a cumulative histogram of |x| on the same grid.

Then ``mse`` keeps the candidate with the least total error (the widest on a tie) and ``percentile`` the
narrowest one that leaves at most ``(100 - p)%`` of the elements outside. The activations never leave ONNX
Runtime, as in :mod:`graphprune.quantize.ranges`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphprune.calibration.providers import resolve_providers
from graphprune.calibration.request import CalibrationRequest
from graphprune.calibration.session import Session, values_by_name
from graphprune.calibration.taps import TapBuilder, TapPlan, connected, tapped_model
from graphprune.errors import GraphpruneError
from graphprune.quantize.config import QuantizeConfig
from graphprune.quantize.qdq import CODE_TYPES
from graphprune.quantize.ranges import ChannelRange

CLIP_FRACTIONS = 2.0 ** (-np.arange(24) / 4.0)  # of max|x|: 1, 0.84, 0.71, ..., 0.019


def clipped_range(low: float, high: float, threshold: float) -> tuple[float, float]:
    """The range ``[low, high]`` cut to ``[-threshold, threshold]``: never wider than the calibrated one."""
    return max(low, -threshold), min(high, threshold)


def candidate_grids(
    config: QuantizeConfig, low: float, high: float, absmax: float | None = None
) -> tuple[np.ndarray, np.ndarray, str]:
    """Per candidate threshold (``CLIP_FRACTIONS`` of ``absmax``, default ``max(|low|, |high|)``): the scales
    (float32 ``[K]``) and zero points (``[K]``, code type) of the activation grid, and the code kind."""
    from graphprune.quantize.passes import activation_grid  # the pass imports this module's choices

    peak = max(abs(low), abs(high)) if absmax is None else absmax
    grids = [activation_grid(config, *clipped_range(low, high, f * peak)) for f in CLIP_FRACTIONS]
    kind = grids[0][2]
    scales = np.array([g[0] for g in grids], np.float32)
    zeros = np.array([g[1] for g in grids], dtype=CODE_TYPES[kind][0])
    return scales, zeros, kind


@dataclass
class ClipScores:
    """Per candidate the summed squared error (mse) or the count of |x| above it (percentile), over all batches."""

    scores: np.ndarray  # float64 [K]
    elements: int = 0


def choose_fraction(scores: ClipScores, method: str, percentile: float) -> float:
    """The chosen ``CLIP_FRACTIONS`` entry: least error (mse), or narrowest within the percentile."""
    if method == "mse":
        return float(CLIP_FRACTIONS[int(np.argmin(scores.scores))])  # argmin: the first, i.e. widest, on a tie
    allowed = (1.0 - percentile / 100.0) * scores.elements
    within = np.flatnonzero(scores.scores <= allowed)  # counts grow as the threshold falls; k = 0 has none above
    return float(CLIP_FRACTIONS[int(within.max(initial=0))])


@contextmanager
def _clip_taps(
    model: ir.Model, ranges: Mapping[str, ChannelRange], config: QuantizeConfig, method: str
) -> Iterator[tuple[TapPlan, list[str]]]:
    """Per activation the name of its ``[K]`` score output (connected to the model inside the block)."""
    values = values_by_name(model.graph)
    b = TapBuilder(model, values, TapPlan(taps=[]))
    k = len(CLIP_FRACTIONS)
    names: list[str] = []
    with connected(b.plan) as plan:
        for name, r in ranges.items():
            b.anchor = x = values[name]
            if x.dtype != ir.DataType.FLOAT:  # fp16/bf16 activations: compare in float32
                x = b.node("Cast", [x], "float32", to=ir.DataType.FLOAT.value)
            flat = b.reshape(x, [1, -1])  # per-tensor scales: the layout does not matter
            low, high = r.tensor_range()
            if method == "mse":
                scales, zeros, kind = candidate_grids(config, low, high)
                wide = b.node("Expand", [flat, b.const([k, 1], "shape")], "candidates")
                s = b.array(scales, "scales")
                z = b.array(zeros, "zero_points", CODE_TYPES[kind][1])
                q = b.node("QuantizeLinear", [wide, s, z], "quantized", axis=0)
                dq = b.node("DequantizeLinear", [q, s, z], "dequantized", axis=0)
                score = b.reduce_sumsq(b.node("Sub", [dq, flat], "error"), [1])
                dtype = ir.DataType.FLOAT
            else:
                peak = max(abs(low), abs(high))
                thresholds = b.array((CLIP_FRACTIONS * peak).astype(np.float32)[:, None], "thresholds")
                above = b.node("Greater", [b.node("Abs", [flat], "abs"), thresholds], "above")
                score = b.reduce_sum(b.node("Cast", [above], "count", to=ir.DataType.INT64.value), [1])
                dtype = ir.DataType.INT64
            b.output(score, dtype, [k])
            size = b.node("Size", [flat], "size")
            b.output(size, ir.DataType.INT64, [])
            names += [str(score.name), str(size.name)]
        yield plan, names


def collect_clip_scores(
    model: ir.Model,
    ranges: Mapping[str, ChannelRange],
    config: QuantizeConfig,
    method: str,
    request: CalibrationRequest,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, ClipScores]:
    """Every candidate's score for each activation of ``ranges`` (its calibrated range, after any smoothing of
    ``model``), summed over ``request``'s data."""
    if method not in ("mse", "percentile"):
        raise GraphpruneError(f"unknown clip method {method!r}: choose minmax, mse or percentile")
    if not ranges:
        return {}
    feeds = request.open(model)
    with _clip_taps(model, ranges, config, method) as (plan, names):
        session = Session(tapped_model(model, plan), resolve_providers(request.provider), request.optimize)
    scores = {name: ClipScores(np.zeros(len(CLIP_FRACTIONS))) for name in ranges}
    seen = 0
    for label, feed in feeds:
        results = session.run(names, feed, label)
        for i, name in enumerate(ranges):
            scores[name].scores += results[2 * i].astype(np.float64)
            scores[name].elements += int(results[2 * i + 1])
        seen += 1
        if on_batch:
            on_batch(seen)
    if not seen:
        raise GraphpruneError("the calibration data is empty")
    return scores


def clip_fractions(
    model: ir.Model,
    ranges: Mapping[str, ChannelRange],
    config: QuantizeConfig,
    request: CalibrationRequest,
) -> dict[str, float]:
    """Per activation the chosen fraction of its ``max|x|`` (``config.clip``; all 1.0 for ``minmax``)."""
    if config.clip == "minmax":
        return dict.fromkeys(ranges, 1.0)
    scores = collect_clip_scores(model, ranges, config, config.clip, request)
    return {name: choose_fraction(s, config.clip, config.percentile) for name, s in scores.items()}
