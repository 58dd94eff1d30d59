"""Channel moments and hidden-state similarity for structured pruning, reduced inside ONNX Runtime.

A small tapped run of its own (the weight taps of :mod:`graphprune.calibration.taps` give Σx² per weight; shrink
needs Σx as well, per activation, and block similarities): each channel tap reduces an activation to Σx and Σx²
per channel (and, when asked, to its Gram matrix Σxxᵀ over the channels, for the refit after removal), each pair
tap reduces two hidden states to ⟨x, y⟩, ‖x‖², ‖y‖² per token. Only these small results
are fetched, accumulated in float64. The taps are built and cut like the weight taps (:mod:`.taps`,
:mod:`.session`): connected to the model only while the session model is made, the graph ending at the last tap,
the weights handed to ONNX Runtime without a copy (no single protobuf, so no 2 GB limit).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphprune.algorithms.structured import block_influence
from graphprune.calibration.gram_taps import GramSampling, GramSums, GramTap, gram_tap
from graphprune.calibration.providers import resolve_providers
from graphprune.calibration.request import CalibrationRequest
from graphprune.calibration.session import Session, values_by_name
from graphprune.calibration.stats_checks import refuse_non_finite
from graphprune.calibration.taps import TapBuilder, TapPlan, tapped_model
from graphprune.errors import GraphpruneError


@dataclass(frozen=True)
class ChannelTap:
    value: str  # tensor name
    axis: int  # negative channel axis
    width: int  # channels on that axis
    rank: int | None = None  # the tensor's rank, needed when the channel axis is not the last
    gram: bool = False  # also Σ x xᵀ over the channels (width x width)
    gram_stride: int = 1  # the Gram matrix (with its own Σx and rows) from every n-th row only: 1/n of its cost
    # where an attention mask provably marks the rows (:func:`token_mask`), the padded rows in the Gram matrix
    # (with its own Σx and rows): 1 every one (the plain Gram matrix), n > 1 every n-th weighted n (an unbiased
    # estimate of it at real + padded / n of its cost), 0 none (real tokens only)
    pad_stride: int = 1


@dataclass(kw_only=True)
class Moments:
    """Σx, Σx² per channel (Σxxᵀ where asked) and rows per tapped tensor; summed (1 - cos) and tokens per pair."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    sumsq: dict[str, np.ndarray] = field(default_factory=dict)
    grams: dict[str, np.ndarray] = field(default_factory=dict)
    gram_sums: dict[str, np.ndarray] = field(default_factory=dict)  # Σx over the Gram's rows, when not all rows
    gram_rows: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    pair_terms: dict[tuple[str, str], list[list[np.ndarray]]] = field(default_factory=dict)  # per batch
    warnings: list[str] = field(default_factory=list)

    def gram_terms(self, name: str) -> tuple[np.ndarray, np.ndarray, int]:
        """Σxxᵀ, Σx and rows over the same rows (the Gram's own when it was strided)."""
        if name in self.gram_sums:
            return self.grams[name], self.gram_sums[name], self.gram_rows[name]
        return self.grams[name], self.sums[name], self.rows[name]

    def influence(self, pair: tuple[str, str]) -> float:
        dot, na, nb = (np.concatenate(t) for t in zip(*self.pair_terms[pair], strict=True))
        return block_influence(dot, na, nb)


@contextmanager
def _moment_taps(
    model: ir.Model, channels: Sequence[ChannelTap], pairs: Sequence[tuple[str, str]]
) -> Iterator[tuple[TapPlan, list[tuple[str, str | tuple[str, str], str]], dict[str, GramTap]]]:
    """The reductions as a :class:`TapPlan` (connected to the model's values inside the block), per output what
    it is: ``(part, tapped tensor or pair, output name)``, and the Gram taps by tapped tensor."""
    values = values_by_name(model.graph)
    plan = TapPlan(taps=[])
    b = TapBuilder(model, values, plan)
    fetch: list[tuple[str, str | tuple[str, str], str]] = []
    grams: dict[str, GramTap] = {}

    def fetched(
        part: str, key: str | tuple[str, str], value: ir.Value, dtype: ir.DataType, shape: list[int]
    ) -> None:
        b.output(value, dtype, shape)
        fetch.append((part, key, str(value.name)))

    def float32(x: ir.Value) -> ir.Value:
        return x if x.dtype == ir.DataType.FLOAT else b.node("Cast", [x], "float32", to=ir.DataType.FLOAT.value)

    try:
        for tap in channels:
            b.anchor = values[tap.value]
            x = float32(values[tap.value])
            shape = values[tap.value].shape
            rank = tap.rank if tap.rank is not None else shape.rank() if shape is not None else None
            if tap.axis != -1:
                if rank is None:
                    raise GraphpruneError(f"tensor {tap.value}: unknown rank, cannot reduce its channel axis")
                axis = rank + tap.axis
                x = b.node("Transpose", [x], "channel_last", perm=[i for i in range(rank) if i != axis] + [axis])
            rows = b.reshape(x, [-1, tap.width])
            fetched("sum", tap.value, b.reduce_sum(rows, [0]), ir.DataType.FLOAT, [tap.width])
            fetched("sumsq", tap.value, b.reduce_sumsq(rows, [0]), ir.DataType.FLOAT, [tap.width])
            fetched("size", tap.value, b.node("Size", [rows], "size"), ir.DataType.INT64, [])
            if tap.gram:
                sampling = GramSampling(tap.gram_stride, tap.pad_stride, triangle=True)
                grams[tap.value] = gram_tap(b, model, values[tap.value], rows, tap.axis, tap.width, sampling)
        for a, c in pairs:
            b.anchor = values[c]
            xa, xc = float32(values[a]), float32(values[c])
            terms = [
                b.reduce_sum(b.node("Mul", [xa, xc], "dot"), [-1]),
                b.reduce_sumsq(xa, [-1]),
                b.reduce_sumsq(xc, [-1]),
            ]
            for part, value in zip(("dot", "na", "nb"), terms, strict=True):
                fetched(part, (a, c), b.reshape(value, [-1]), ir.DataType.FLOAT, [-1])
        yield plan, fetch, grams
    finally:
        for node in plan.nodes:  # the model's values forget their tap uses
            node.resize_inputs(0)


def collect_moments(
    model: ir.Model,
    channels: Sequence[ChannelTap],
    pairs: Sequence[tuple[str, str]],
    request: CalibrationRequest,
    on_batch: Callable[[int], None] | None = None,
) -> Moments:
    """Run ``model`` over ``request``'s data and return the moments of ``channels`` and the ``pairs``' terms.

    The model is cut after its last tapped tensor and handed to ONNX Runtime without a copy of its weights (as
    :func:`graphprune.calibration.run.calibrate` does), so models past protobuf's 2 GB limit work too."""
    feeds = request.open(model)
    with _moment_taps(model, channels, pairs) as (plan, fetch, gram_taps):
        session = Session(tapped_model(model, plan), resolve_providers(request.provider), request.optimize)
    out = Moments(warnings=list(feeds.source.warnings))
    names = plan.output_names
    grams = {key: GramSums(tap) for key, tap in gram_taps.items()}
    seen = 0
    for label, feed in feeds:
        results = dict(zip(names, session.run(names, feed, label), strict=True))
        pending: dict[tuple[str, str], list[np.ndarray]] = {}
        batch_rows: dict[str, int] = {}
        for part, key, name in fetch:
            array = results[name]
            if isinstance(key, tuple):  # a pair's dot and norms
                pending.setdefault(key, []).append(array.astype(np.float64))
            elif part == "sum":
                out.sums[key] = out.sums.get(key, 0) + array.astype(np.float64)
            elif part == "sumsq":
                out.sumsq[key] = out.sumsq.get(key, 0) + array.astype(np.float64)
            elif part == "size":
                batch_rows[key] = int(array) // len(out.sums[key])  # "sum" is fetched before "size"
                out.rows[key] = out.rows.get(key, 0) + batch_rows[key]
        for key, sums in grams.items():
            sums.add(results, batch_rows[key])
        for pair, terms in pending.items():
            out.pair_terms.setdefault(pair, []).append(terms)
        seen += 1
        if on_batch:
            on_batch(seen)
    if not seen:
        raise GraphpruneError("the calibration data is empty")
    for key, sums in grams.items():
        out.grams[key], total, rows = sums.result()
        if total is not None and rows is not None:  # the Gram's own rows: strided or sampled by the token mask
            out.gram_sums[key], out.gram_rows[key] = total, rows
    refuse_non_finite({**out.sums, **out.sumsq})  # NaN scores would choose the channels at random
    flat = {f"{a} and {b}": [np.ravel(x) for batch in t for x in batch] for (a, b), t in out.pair_terms.items()}
    refuse_non_finite({pair: np.concatenate(arrays) for pair, arrays in flat.items()})
    return out
