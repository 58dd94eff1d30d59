"""Write channel permutations into a graph where they are exact, so that N:M masks keep more importance.

The channel groups themselves (which weights share a permutable K, and with what period) are found by
:func:`graphprune.graph.channel_groups.find_permutation_groups`, on the coupling walker of
:mod:`graphprune.graph.coupling`.

:class:`PermutePass` writes the best order of each group into the model; pruning after it (``PrunePass``, in an
``ir.passes.Sequential`` or through ``PruneConfig(permute=True)``) reads the order the pass recorded on each reader
to line the statistics up with the new K.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import cast

import numpy as np
import onnx_ir as ir

from graphprune.algorithms.layout import to_canonical
from graphprune.algorithms.pattern import NMPattern
from graphprune.algorithms.permutation import search_permutation
from graphprune.algorithms.scores import Method, magnitude_scores, wanda_scores
from graphprune.graph.channel_groups import ChannelGroup, find_permutation_groups
from graphprune.graph.stored import read_array, replace_tensor, stored_tensor, stored_values
from graphprune.graph.targets import Target, find_targets
from graphprune.graph.weights import read_weight
from graphprune.passes.base import (
    CHANNEL_ORDER,
    PERMUTATION_REPORT,
    PassPreconditionError,
    StatisticsInput,
    channel_order,
    describe_statistics,
    statistics_parts,
    sumsq_in_model_order,
)


@dataclass(kw_only=True)
class PermutedGroup:
    """The report of one permutation written into the model."""

    reader: str
    writers: list[str]
    biases: list[str]
    kind: str
    period: int
    kept_before: float  # importance kept by the N:M mask in the original order (fraction of the total)
    kept_after: float
    recovered: float  # share of the importance the original order's mask loses that the permutation keeps
    written: bool  # False where no order kept more than the original one: the model keeps its order


def find_channel_groups(model: ir.Model) -> tuple[dict[str, ChannelGroup], dict[str, Target]]:
    """Every exact channel group of the model by reader name, and the model's weights by name.

    Shapes come from the model (an exporter's value_info); where the model carries none, ONNX shape inference
    fills them in (on the graph's values only).
    """
    if not any(v.shape is not None for n in model.graph for v in n.outputs if not v.is_graph_output()):
        from onnx_ir.passes.common import ShapeInferencePass

        ShapeInferencePass()(model)
    targets = find_targets(model, include_head=True).targets
    by_name = {t.name: t for t in targets}
    groups = find_permutation_groups(model, targets)
    return groups, by_name


def full_order(order: np.ndarray, length: int) -> np.ndarray:
    """A period-p order (``len(order) == p``) repeated over ``length`` channels: block b maps to b·p + order."""
    period = len(order)
    return (np.arange(0, length, period)[:, None] + order[None, :]).reshape(-1)


def write_permutation(
    model: ir.Model, group: ChannelGroup, order: np.ndarray, targets: dict[str, Target]
) -> list[str]:
    """Reorder the group's channels in the stored weights (new channel i is old channel ``order[i]``, in every
    period); returns the names of the tensors rewritten."""
    stored = stored_values(model.graph)
    moves = [(group.reader, targets[group.reader].k_axis)]
    moves += [(name, targets[name].out_axis) for name in group.writers]
    for name, axis in moves:
        weight = read_weight(stored, targets[name])
        index = full_order(order, weight.values.shape[axis])
        weight.write(np.ascontiguousarray(np.take(weight.values, index, axis=axis)))
    for name in group.biases:
        old = stored_tensor(stored[name])
        values = read_array(old)
        permuted = np.take(values, full_order(order, values.shape[-1]), axis=-1)
        replace_tensor(stored[name], ir.Tensor(np.ascontiguousarray(permuted), dtype=old.dtype, name=old.name))
    return [name for name, _ in moves] + list(group.biases)


ChannelGroups = tuple[dict[str, ChannelGroup], dict[str, Target]]  # find_channel_groups' answer


def channel_groups(model: ir.Model) -> ChannelGroups:
    """:func:`find_channel_groups` on a copy of the graph (tensors shared, not copied): the shapes it may infer
    stay off the caller's model."""
    return find_channel_groups(model.clone())


@dataclass
class PermuteResult(ir.passes.PassResult):
    """What :class:`PermutePass` did: one report per group searched, and the stored tensors it rewrote."""

    groups: list[PermutedGroup] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)


class PermutePass(ir.passes.InPlacePass):
    """Write into the model, for each channel group, the order of its channels that keeps the most importance
    under ``pattern``: ``PermutePass(pattern=NMPattern(2, 4), method=Method.WANDA, stats=stats)(model)``.

    The order is scored with the reader's |W|·‖X‖ (Wanda's score; SparseGPT and ALPS choose their masks from a
    saliency of the same kind), |W| for magnitude or without statistics; a period shorter than K (heads) stacks
    the blocks. An order is written only where it keeps more than the present one. ``readers`` limits the pass
    to the groups these weights read, in this order (default: every group); ``groups`` is
    :func:`channel_groups`' answer when the caller already has it (the graph's wiring, which neither
    permutation nor pruning changes).

    The statistics are in the channel order they were measured in. Each reader's value records the order its K
    now has in those terms, and the group's report, in its ``meta`` (:data:`~graphprune.passes.base.
    CHANNEL_ORDER`): pruning reads them from there, and a second permutation composes with the first.
    """

    def __init__(
        self,
        *,
        pattern: NMPattern,
        method: Method = Method.MAGNITUDE,
        stats: StatisticsInput = None,
        readers: Sequence[str] | None = None,
        groups: ChannelGroups | None = None,
    ) -> None:
        super().__init__()
        self.pattern = pattern
        self.method = method
        self.stats = stats
        self.readers = tuple(readers) if readers is not None else None
        self.groups = groups

    def __repr__(self) -> str:
        readers = "all" if self.readers is None else list(self.readers)
        return (
            f"PermutePass(pattern={self.pattern}, method={self.method.value}, "
            f"stats={describe_statistics(self.stats)}, readers={readers})"
        )

    def requires(self, model: ir.Model) -> None:
        if not isinstance(self.pattern, NMPattern):
            raise PassPreconditionError(f"channel permutation serves N:M patterns, not {self.pattern}")

    def __call__(self, model_or_result: ir.Model | ir.passes.PassResult, /) -> PermuteResult:
        # this pass's own result type (onnx-ir types it as a plain PassResult)
        return cast(PermuteResult, super().__call__(model_or_result))

    def call(self, model: ir.Model) -> PermuteResult:
        groups, weights = self.groups if self.groups is not None else channel_groups(model)
        sumsq, _ = statistics_parts(self.stats)
        stored = stored_values(model.graph)
        result = PermuteResult(model, False)
        for name in self.readers if self.readers is not None else list(groups):
            if name not in groups:
                continue
            group = groups[name]
            reader = weights[group.reader]
            value = stored[reader.name]
            w = to_canonical(read_weight(stored, reader).effective(), reader.k_axis, reader.out_axis)[:, 0, :]
            measured = sumsq.get(reader.name) if sumsq is not None else None
            scores = _order_scores(
                self.method, w, None if measured is None else sumsq_in_model_order(value, measured)
            )
            found = search_permutation(scores.reshape(-1, group.period), self.pattern)
            written = found.kept > found.identity_kept
            if written:
                result.rewritten += write_permutation(model, group, found.order, weights)
                index = full_order(found.order, reader.k)
                before = channel_order(value)
                value.meta[CHANNEL_ORDER] = index if before is None else before[index]
                result.modified = True
            total = found.total or 1.0
            report = PermutedGroup(
                reader=group.reader, writers=list(group.writers), biases=list(group.biases), kind=group.kind,
                period=group.period, kept_before=round(found.identity_kept / total, 6),
                kept_after=round(max(found.kept, found.identity_kept) / total, 6),
                recovered=round(max(found.recovered, 0.0), 6), written=written,
            )  # fmt: skip
            value.meta[PERMUTATION_REPORT] = asdict(report)
            result.groups.append(report)
        return result


def _order_scores(method: Method, w: np.ndarray, sumsq: np.ndarray | None) -> np.ndarray:
    if method is Method.MAGNITUDE or sumsq is None:
        return magnitude_scores(w)
    return wanda_scores(w, sumsq)
