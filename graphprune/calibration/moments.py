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

import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphprune.algorithms.structured import block_influence
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
) -> Iterator[tuple[TapPlan, list[tuple[str, str | tuple[str, str], str]]]]:
    """The reductions as a :class:`TapPlan` (connected to the model's values inside the block), and per output
    what it is: ``(part, tapped tensor or pair, output name)``."""
    values = values_by_name(model.graph)
    plan = TapPlan(taps=[])
    b = TapBuilder(model, values, plan)
    fetch: list[tuple[str, str | tuple[str, str], str]] = []

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
            if tap.gram:  # one MatMul in the graph: only the width x width result leaves ONNX Runtime
                sample = _gram_rows(b, model, tap, values[tap.value], rows, fetched)
                transposed = b.node("Transpose", [sample], "rows_t", perm=[1, 0])
                for (r0, r1), (c0, c1) in gram_blocks(tap.width, b.opset):
                    left, right = transposed, sample
                    if (r0, r1) != (0, tap.width):  # one block of the upper triangle: X_Rᵀ X_C
                        left = b.node("Slice", [transposed, *_range(b, r0, r1, 0)], "rows_t_block")
                        right = b.node("Slice", [sample, *_range(b, c0, c1, 1)], "rows_block")
                    gram = b.node("MatMul", [left, right], "gram")
                    fetched(f"gram:{r0}:{c0}", tap.value, gram, ir.DataType.FLOAT, [r1 - r0, c1 - c0])
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
        yield plan, fetch
    finally:
        for node in plan.nodes:  # the model's values forget their tap uses
            node.resize_inputs(0)


def token_mask(model: ir.Model, value: ir.Value) -> ir.Value | None:
    """The graph input ``attention_mask`` when it provably marks ``value``'s rows: ``value`` is
    ``[*mask dims, channels]`` with the mask's dimensions (the same symbols or sizes), so its rows in order are the
    mask's entries in order. Else None (a decoder's mask over past and new tokens has another length)."""
    mask = next((v for v in model.graph.inputs if v.name == "attention_mask"), None)
    if mask is None or mask.shape is None or value.shape is None or mask.dtype not in _MASK_TYPES:
        return None
    dims, lead = list(mask.shape), list(value.shape)[:-1]
    known = all(isinstance(d, int) or d.value is not None for d in dims)
    same = len(lead) == len(dims) and all(a == b for a, b in zip(lead, dims, strict=True))
    return mask if known and same else None


# 1 for a real token, 0 for padding; a float mask may be additive (0 real, -inf padded), so it is never read
_MASK_TYPES = (ir.DataType.INT64, ir.DataType.INT32, ir.DataType.BOOL)
Fetch = Callable[[str, str, ir.Value, ir.DataType, list[int]], None]


def _gram_rows(
    b: TapBuilder, model: ir.Model, tap: ChannelTap, value: ir.Value, rows: ir.Value, fetched: Fetch
) -> ir.Value:
    """The rows the Gram matrix of ``tap`` is computed from, fetching their Σx and counts where they are not all
    of ``rows``: strided, and where a token mask marks the rows, the real tokens' and a weighted sample of the
    padded ones (as many weighted rows as padded ones, in expectation)."""
    mask = token_mask(model, value) if tap.pad_stride != 1 and tap.axis == -1 and b.opset >= 10 else None
    if mask is None:
        if tap.gram_stride == 1 or b.opset < 10:
            return rows
        sample = _every(b, rows, tap.gram_stride)
        fetched("gram_sum", tap.value, b.reduce_sum(sample, [0]), ir.DataType.FLOAT, [tap.width])
        fetched("gram_size", tap.value, b.node("Size", [sample], "size"), ir.DataType.INT64, [])
        return sample
    real = b.reshape(b.node("Cast", [mask], "real", to=ir.DataType.BOOL.value), [-1])
    fetched("mask_size", tap.value, b.node("Size", [real], "size"), ir.DataType.INT64, [])
    sample = _every(b, b.node("Compress", [rows, real], "real_rows", axis=0), tap.gram_stride)
    total = b.reduce_sum(sample, [0])
    fetched("gram_size", tap.value, b.node("Size", [sample], "size"), ir.DataType.INT64, [])
    if tap.pad_stride > 1:  # Σ over every n-th padded row, n times: n Σ x (and n x xᵀ, from rows scaled by √n)
        padded = b.node("Compress", [rows, b.node("Not", [real], "padded")], "padded_rows", axis=0)
        padded = _every(b, padded, tap.gram_stride * tap.pad_stride)
        fetched("pad_size", tap.value, b.node("Size", [padded], "size"), ir.DataType.INT64, [])
        n = float(tap.pad_stride)
        weighted = b.node("Mul", [b.reduce_sum(padded, [0]), b.array(np.array([n], np.float32), "n")], "weighted")
        total = b.node("Add", [total, weighted], "sum")
        scaled = b.node("Mul", [padded, b.array(np.array([np.sqrt(n)], np.float32), "root_n")], "scaled")
        sample = b.node("Concat", [sample, scaled], "rows", axis=0)
    fetched("gram_sum", tap.value, total, ir.DataType.FLOAT, [tap.width])
    return sample


def _every(b: TapBuilder, rows: ir.Value, stride: int) -> ir.Value:
    if stride == 1:
        return rows
    step = [b.const([0], "starts"), b.const([2**62], "ends"), b.const([0], "axes"), b.const([stride], "steps")]
    return b.node("Slice", [rows, *step], "rows")


GRAM_BLOCK = 384  # Gram matrices wider than twice this are computed as blocks of the upper triangle


def gram_blocks(width: int, opset: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """The ``(rows, columns)`` ranges of the blocks of ``XᵀX`` to compute: the whole matrix, or for a wide one the
    blocks on and above the diagonal of an n x n tiling (the others are their transposes): n(n+1)/2 of n² blocks,
    5/8 of the multiply-adds at n = 4."""
    n = width // GRAM_BLOCK if opset >= 10 else 1
    if n < 2:
        return [((0, width), (0, width))]
    edges = [width * i // n for i in range(n + 1)]
    spans = list(itertools.pairwise(edges))
    return [(spans[i], spans[j]) for i in range(n) for j in range(i, n)]


def _range(b: TapBuilder, start: int, end: int, axis: int) -> list[ir.Value]:
    return [b.const([start], "starts"), b.const([end], "ends"), b.const([axis], "axes")]


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
    with _moment_taps(model, channels, pairs) as (plan, fetch):
        session = Session(tapped_model(model, plan), resolve_providers(request.provider), request.optimize)
    out = Moments(warnings=list(feeds.source.warnings))
    names = [name for _, _, name in fetch]
    mirrored: set[tuple[str, int, int, int, int]] = set()
    seen = batch_rows = 0
    strides = {tap.value: tap.pad_stride for tap in channels}
    for label, feed in feeds:
        results = session.run(names, feed, label)
        pending: dict[tuple[str, str], list[np.ndarray]] = {}
        for (part, key, _), array in zip(fetch, results, strict=True):
            if isinstance(key, tuple):  # a pair's dot and norms
                pending.setdefault(key, []).append(array.astype(np.float64))
            elif part == "sum":
                out.sums[key] = out.sums.get(key, 0) + array.astype(np.float64)
            elif part == "sumsq":
                out.sumsq[key] = out.sumsq.get(key, 0) + array.astype(np.float64)
            elif part.startswith("gram:"):  # a block on or above the diagonal, at its offsets
                r0, c0 = (int(v) for v in part.split(":")[1:])
                if key not in out.grams:
                    out.grams[key] = np.zeros((len(out.sums[key]),) * 2)  # "sum" is fetched before the blocks
                out.grams[key][r0 : r0 + array.shape[0], c0 : c0 + array.shape[1]] += array
                if r0 != c0:
                    mirrored.add((key, r0, r0 + array.shape[0], c0, c0 + array.shape[1]))
            elif part == "gram_sum":
                out.gram_sums[key] = out.gram_sums.get(key, 0) + array.astype(np.float64)
            elif part == "mask_size" and int(array) != batch_rows:  # its tensor's "size" came before
                raise GraphpruneError(f"tensor {key}: {batch_rows} rows, {int(array)} attention-mask values")
            elif part in ("gram_size", "pad_size"):  # padded rows count n times each
                weight = strides[key] if part == "pad_size" else 1
                out.gram_rows[key] = out.gram_rows.get(key, 0) + weight * int(array) // len(out.sums[key])
            elif part == "size":
                batch_rows = int(array) // len(out.sums[key])
                out.rows[key] = out.rows.get(key, 0) + batch_rows
        for pair, terms in pending.items():
            out.pair_terms.setdefault(pair, []).append(terms)
        seen += 1
        if on_batch:
            on_batch(seen)
    if not seen:
        raise GraphpruneError("the calibration data is empty")
    for key, r0, r1, c0, c1 in mirrored:  # the blocks below the diagonal are the transposes of those above
        out.grams[key][c0:c1, r0:r1] = out.grams[key][r0:r1, c0:c1].T
    refuse_non_finite({**out.sums, **out.sumsq})  # NaN scores would choose the channels at random
    flat = {f"{a} and {b}": [np.ravel(x) for batch in t for x in batch] for (a, b), t in out.pair_terms.items()}
    refuse_non_finite({pair: np.concatenate(arrays) for pair, arrays in flat.items()})
    return out
