"""Gram taps: Σ x xᵀ over an activation's rows (with their Σx and count), reduced inside ONNX Runtime.

The one builder of every calibration Gram matrix: the weight taps of ``apply`` and its sequential engine
(:mod:`.taps`), ``shrink``'s moments (:mod:`.moments`, and streamed through the engine for ``shrink --sequential``)
and the dense targets' cross-Gram matrices (:mod:`graphprune.pipeline.dense_targets`, from the same rows).

Which rows (:class:`GramSampling`): all of them (``apply``'s default), every n-th (1/n of the cost), and where an
attention mask provably marks the rows (:func:`token_mask`), the real tokens plus every n-th padded row weighted
n (an unbiased estimate of the padded rows' share at 1/n of their cost), or no padded row. A sample that is not
all rows has its own Σx and row count, fetched beside the Gram matrix: the refit's mean must come from the same
rows as its Gram matrix. Wide Gram matrices can be computed as the blocks of their upper triangle (``triangle``).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from graphprune.errors import GraphpruneError

if TYPE_CHECKING:  # taps.py builds its Gram taps here
    from graphprune.calibration.taps import TapBuilder


@dataclass(frozen=True)
class GramSampling:
    """The rows a Gram matrix is computed from, and how."""

    stride: int = 1  # every n-th row only (of the real tokens, where a mask marks them)
    # where an attention mask marks the rows: 1 every padded row, n > 1 every n-th weighted n, 0 none
    pad_stride: int = 1
    triangle: bool = False  # wide matrices as blocks on and above the diagonal (5/8 of the multiply-adds at n=4)


ALL_ROWS = GramSampling()


@dataclass(frozen=True, kw_only=True)
class Sample:
    """The rows of a Gram tap as graph values."""

    rows: ir.Value  # [rows, K], padded rows scaled by √n: a product of two samples weights them n
    total: ir.Value | None = None  # Σ over the sample (padded rows weighted n); None: every row, the tap's own Σx
    parts: tuple[tuple[ir.Value, int], ...] = ()  # the row sets sampled, with the weight each row counts
    real: ir.Value | None = None  # the flattened token mask, whose size must be the rows'


@dataclass(frozen=True, kw_only=True)
class GramTap:
    """The outputs of one Gram reduction and how to add them up (:class:`GramSums`)."""

    activation: str
    k: int
    sampling: GramSampling
    blocks: tuple[tuple[slice, slice, str], ...]  # (rows, columns, output) of each block computed
    sum_output: str | None  # Σx over the sample, where it is not every row
    counts: tuple[tuple[str, int], ...]  # (elements of a row set, the weight of each of its rows)
    mask_output: str | None  # the token mask's size, checked against the rows


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


def sample_rows(
    b: TapBuilder, model: ir.Model, like: ir.Value, rows: ir.Value, axis: int, sampling: GramSampling
) -> Sample:
    """The rows ``sampling`` takes of ``rows`` (``[rows, K]``, from a tensor shaped as ``like`` with its channels
    on ``axis``). The same call on two tensors of one shape (pruned and dense activations) takes the same rows."""
    mask = token_mask(model, like) if sampling.pad_stride != 1 and axis == -1 and b.opset >= 10 else None
    if mask is None:
        if sampling.stride == 1 or b.opset < 10:
            return Sample(rows=rows)
        sample = _every(b, rows, sampling.stride)
        return Sample(rows=sample, total=b.reduce_sum(sample, [0]), parts=((sample, 1),))
    real = b.reshape(b.node("Cast", [mask], "real", to=ir.DataType.BOOL.value), [-1])
    sample = _every(b, b.node("Compress", [rows, real], "real_rows", axis=0), sampling.stride)
    total, parts = b.reduce_sum(sample, [0]), [(sample, 1)]
    if sampling.pad_stride > 1:
        # Σ over every n-th padded row, n times: n Σ x (and n x xᵀ, from rows scaled by √n)
        padded = b.node("Compress", [rows, b.node("Not", [real], "padded")], "padded_rows", axis=0)
        padded = _every(b, padded, sampling.stride * sampling.pad_stride)
        parts.append((padded, sampling.pad_stride))
        n = float(sampling.pad_stride)
        weighted = b.node("Mul", [b.reduce_sum(padded, [0]), b.array(np.array([n], np.float32), "n")], "weighted")
        total = b.node("Add", [total, weighted], "sum")
        scaled = b.node("Mul", [padded, b.array(np.array([np.sqrt(n)], np.float32), "root_n")], "scaled")
        sample = b.node("Concat", [sample, scaled], "rows", axis=0)
    return Sample(rows=sample, total=total, parts=tuple(parts), real=real)


def _every(b: TapBuilder, rows: ir.Value, stride: int) -> ir.Value:
    if stride == 1:
        return rows
    step = [b.const([0], "starts"), b.const([2**62], "ends"), b.const([0], "axes"), b.const([stride], "steps")]
    return b.node("Slice", [rows, *step], "rows")


def gram_tap(
    b: TapBuilder, model: ir.Model, value: ir.Value, rows: ir.Value, axis: int, k: int, sampling: GramSampling
) -> GramTap:
    """Add the Gram taps of ``rows`` (``[rows, K]`` float32 of ``value``, channels on ``axis``) as outputs of
    ``b``'s plan: one MatMul per block in the graph, so only ``K x K`` results leave ONNX Runtime."""
    sample = sample_rows(b, model, value, rows, axis, sampling)

    def output(v: ir.Value, dtype: ir.DataType, shape: list[int]) -> str:
        b.output(v, dtype, shape)
        return str(v.name)

    transposed = b.node("Transpose", [sample.rows], "rows_t", perm=[1, 0])
    blocks = []
    for (r0, r1), (c0, c1) in gram_blocks(k, b.opset) if sampling.triangle else [((0, k), (0, k))]:
        left, right = transposed, sample.rows
        if (r0, r1) != (0, k):  # one block of the upper triangle: X_Rᵀ X_C
            left = b.node("Slice", [transposed, *_range(b, r0, r1, 0)], "rows_t_block")
            right = b.node("Slice", [sample.rows, *_range(b, c0, c1, 1)], "rows_block")
        gram = b.node("MatMul", [left, right], "gram")
        blocks.append((slice(r0, r1), slice(c0, c1), output(gram, ir.DataType.FLOAT, [r1 - r0, c1 - c0])))
    size = ir.DataType.INT64
    return GramTap(
        activation=str(value.name),
        k=k,
        sampling=sampling,
        blocks=tuple(blocks),
        sum_output=None if sample.total is None else output(sample.total, ir.DataType.FLOAT, [k]),
        counts=tuple((output(b.node("Size", [part], "size"), size, []), n) for part, n in sample.parts),
        mask_output=None if sample.real is None else output(b.node("Size", [sample.real], "size"), size, []),
    )


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


STAGED_BATCHES = 16  # float32 batch terms summed before one float64 add: adding a wide float64 matrix per batch
# cost as much as computing the batch's Gram matrix (one window per run); 16 float32 terms lose ~1e-6 relative


class StagedSum:
    """A float64 sum of per-batch float32 terms, ``STAGED_BATCHES`` of them summed in float32 before each float64
    add. Two sums fed equal terms are equal (the dense cross terms against the Gram matrix: C = H exactly)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.total = np.zeros(shape)
        self._stage: np.ndarray | None = None
        self._terms = 0

    def add(self, term: np.ndarray) -> None:
        if self._stage is None:
            self._stage = np.array(term, np.float32)
        else:
            self._stage += term
        self._terms += 1
        if self._terms == STAGED_BATCHES:
            self.value()

    def value(self) -> np.ndarray:
        """The sum so far (float64)."""
        if self._stage is not None:
            self.total += self._stage
            self._stage, self._terms = None, 0
        return self.total


class GramSums:
    """One :class:`GramTap`'s outputs summed over batches in float64 (:class:`StagedSum`)."""

    def __init__(self, tap: GramTap) -> None:
        self.tap = tap
        self.blocks = [StagedSum((span.stop - span.start, columns.stop - columns.start)) for span, columns, _ in
                       tap.blocks]  # fmt: skip
        self.sum = np.zeros(tap.k) if tap.sum_output is not None else None
        self.rows = 0

    def add(self, outputs: Mapping[str, np.ndarray], rows: int) -> None:
        """One batch's outputs (by name); ``rows``: the rows of the tapped tensor in it."""
        tap = self.tap
        if tap.mask_output is not None and int(outputs[tap.mask_output]) != rows:
            raise GraphpruneError(
                f"tensor {tap.activation}: {rows} rows, {int(outputs[tap.mask_output])} attention-mask values"
            )
        for block, (_, _, name) in zip(self.blocks, tap.blocks, strict=True):
            block.add(outputs[name])
        if self.sum is not None and tap.sum_output is not None:
            self.sum += outputs[tap.sum_output]
        for name, weight in tap.counts:  # padded rows count n times each
            self.rows += weight * int(outputs[name]) // tap.k

    def result(self) -> tuple[np.ndarray, np.ndarray | None, int | None]:
        """Σxxᵀ, and Σx and the rows where the sample is not every row (None: the tap's own)."""
        gram = np.zeros((self.tap.k, self.tap.k))
        for block, (rows, columns, _) in zip(self.blocks, self.tap.blocks, strict=True):
            gram[rows, columns] = block.value()
        for rows, columns, _ in self.tap.blocks:  # the blocks below the diagonal are the transposes of those above
            if rows != columns:
                gram[columns, rows] = gram[rows, columns].T
        return gram, self.sum, self.rows if self.sum is not None else None
