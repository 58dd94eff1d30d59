"""Write channel permutations into a graph where they are exact, so that N:M masks keep more importance.

A *channel group* is a set of channels that some weights write (their output columns, and the biases added
to them) and one weight reads (its K rows), with only channel-preserving ops in between. Reordering the
channels of all of them together leaves every output of the model unchanged, and gives the reader's N:M
groups along K a new composition. Two kinds are found on the onnx-ir graph:

* an MLP's intermediate channels (gate/up output columns with down's K rows; fc1 columns and bias with fc2's K
  rows): the groups of :func:`graphprune.graph.groups.find_groups` (structured pruning's finder, the one place
  that proves such a coupling) that one MatMul/Gemm weight reads;
* the channels inside each attention head (V's output columns with O's K rows), found here by walking back
  from O's activation through ``Reshape``/``Transpose``/``Unsqueeze``/``Squeeze``/``Expand`` that keep the
  channel axis last, ``MatMul(P, V)`` with V from the group (probabilities times values) and the elementwise
  ops of :mod:`graphprune.graph.groups` (with scalar constants, or biases the group then permutes). Where a
  ``Reshape`` splits the channels into heads (``[.., H·d] -> [.., H, d]``) the permutation has to be the same
  in every block of d channels: the *period* of the group is the gcd of every channel-axis length on the way
  (the head size). Every tensor of the group must be read only inside the group, and every shape on the way
  known (the exporter's value_info, or ONNX shape inference), or the group is left alone.

The residual stream (embeddings, norms) is not a group: a ``Gather`` or a ``ReduceMean`` ends both walks.

:class:`PermutePass` writes the best order of each group into the model; pruning after it (``PrunePass``, in an
``ir.passes.Sequential`` or through ``PruneConfig(permute=True)``) reads the order the pass recorded on each reader
to line the statistics up with the new K.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx_ir as ir

from graphprune.algorithms.layout import to_canonical
from graphprune.algorithms.pattern import NMPattern
from graphprune.algorithms.permutation import search_permutation
from graphprune.algorithms.scores import Method, magnitude_scores, wanda_scores
from graphprune.graph.groups import CHANNELWISE_UNARY, ELEMENTWISE_BINARY, Group, find_groups
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

RESHAPING = frozenset({"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand"})


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that ``writers`` write (output axis; ``biases`` along their last axis) and ``reader`` reads (K)."""

    reader: str
    writers: tuple[str, ...]
    biases: tuple[str, ...]
    channels: int  # the reader's K
    period: int  # the permutation repeats in every block of this many channels (heads); == channels for an MLP

    @property
    def kind(self) -> str:
        return "mlp channels" if self.period == self.channels else f"channels inside heads of {self.period}"


@dataclass
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
    groups = _HeadFinder(model.graph, targets).groups()
    for group in find_groups(model, ("mlp",)).groups:
        found = _mlp_group(group, by_name)
        if found is not None:
            groups[found.reader] = found
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
                group.reader, list(group.writers), list(group.biases), group.kind, group.period,
                round(found.identity_kept / total, 6), round(max(found.kept, found.identity_kept) / total, 6),
                round(max(found.recovered, 0.0), 6), written,
            )  # fmt: skip
            value.meta[PERMUTATION_REPORT] = asdict(report)
            result.groups.append(report)
        return result


def _order_scores(method: Method, w: np.ndarray, sumsq: np.ndarray | None) -> np.ndarray:
    if method is Method.MAGNITUDE or sumsq is None:
        return magnitude_scores(w)
    return wanda_scores(w, sumsq)


class _Reject(Exception):
    """The walk met something a permutation cannot pass exactly."""


def _mlp_group(group: Group, targets: dict[str, Target]) -> ChannelGroup | None:
    """Structured pruning's group as a permutation group: one reader (a MatMul/Gemm weight read along its K),
    writers that are targets written along their output axis, and channel-wise constants along their last axis."""
    (reader, *more) = group.consumers or [None]
    if reader is None or more:
        return None
    target = targets.get(str(reader.value.name))
    if target is None or target.op not in ("MatMul", "Gemm") or target.k_axis != reader.axis:
        return None
    writers = [targets.get(str(s.value.name)) for s in group.producers]
    if any(w is None or w.out_axis != s.axis for w, s in zip(writers, group.producers, strict=True)):
        return None
    biases = [s for s in group.slots if s.role == "channelwise"]
    if any(s.axis != len(s.value.shape) - 1 for s in biases):  # type: ignore[arg-type]
        return None
    names = tuple(sorted(w.name for w in writers if w is not None))
    return ChannelGroup(target.name, names, tuple(sorted(str(s.value.name) for s in biases)), target.k, target.k)


class _HeadFinder:
    """The channels inside attention heads (see the module docstring); MLP groups come from graph/groups.py."""

    def __init__(self, graph: ir.Graph, targets: list[Target]) -> None:
        self.graph = graph
        self.targets = {t.name: t for t in targets}
        # A writer: the node that multiplies by a stored target weight, found by its first output.
        self.writer_of: dict[str, Target] = {}
        for t in targets:
            if len(t.consumers) == 1 and "DequantizeLinear" not in t.through:
                self.writer_of[t.consumers[0].output] = t
        self.values: dict[str, ir.Value] = dict(graph.initializers)
        for node in graph:  # the main graph: subgraph bodies are not walked
            for value in node.outputs:
                self.values[value.name] = value
        for value in graph.inputs:
            self.values[value.name] = value

    def groups(self) -> dict[str, ChannelGroup]:
        found = {}
        for t in self.targets.values():
            c = t.consumers[0]
            if len(t.consumers) != 1 or "DequantizeLinear" in t.through or c.op == "Conv" or c.in_subgraph:
                continue
            consumer = t.consumers[0]
            activation = self.values.get(consumer.activation)
            if activation is None or not _last_axis(activation, consumer.activation_axis):
                continue
            try:
                group = self._walk(t, activation)
            except _Reject:
                continue
            if group is not None and group.period < group.channels:
                found[t.name] = group
        return found

    def _walk(self, reader: Target, activation: ir.Value) -> ChannelGroup | None:
        region: set[str] = set()  # values of the group
        nodes: set[int] = set()  # nodes inside the group (not the writers)
        writers: list[str] = []
        biases: list[str] = []
        lengths: list[int] = []
        stack = [activation]
        while stack:
            value = stack.pop()
            if value.name in region:
                continue
            region.add(value.name)
            lengths.append(_last_dim(value))
            if value.name in self.writer_of:
                writer = self.writer_of[value.name]
                writers.append(writer.name)
                node = value.producer()
                if (
                    node is not None
                    and node.op_type == "Gemm"
                    and len(node.inputs) > 2
                    and node.inputs[2] is not None
                ):
                    bias = node.inputs[2]
                    if not bias.is_initializer():
                        raise _Reject
                    if not _broadcast_only(bias):
                        biases.append(bias.name)
                continue
            node = value.producer()
            if node is None or node.outputs[0] is not value or any(o.uses() for o in node.outputs[1:]):
                raise _Reject
            nodes.add(id(node))
            stack.extend(self._inputs_in_group(node, value, biases))
        if not writers:
            return None
        # Every value of the group is read only by the group's nodes or by the reader; no graph outputs.
        reader_output = reader.consumers[0].output
        for name in region:
            value = self.values[name]
            if value.is_graph_output():
                return None
            for use in value.uses():
                is_reader = value is activation and use.node.outputs[0].name == reader_output
                if id(use.node) not in nodes and not is_reader:
                    return None
        for name in biases:
            if len(self.graph.initializers[name].uses()) != 1:
                return None
        period = 0
        for length in [*lengths, reader.k]:
            period = math.gcd(period, length)
        if period == 0:
            return None
        return ChannelGroup(reader.name, tuple(sorted(writers)), tuple(sorted(set(biases))), reader.k, period)

    def _inputs_in_group(self, node: ir.Node, value: ir.Value, biases: list[str]) -> list[ir.Value]:
        """The inputs of ``node`` that carry the group's channels (raises _Reject where it cannot pass)."""
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            raise _Reject
        if op in CHANNELWISE_UNARY:
            return [_required(node.inputs[0])]
        if op in ELEMENTWISE_BINARY:
            carried = []
            for x in node.inputs:
                x = _required(x)
                if x.const_value is not None or x.is_initializer():
                    if _broadcast_only(x):
                        continue
                    if _last_dim(x) == _last_dim(value) and x.is_initializer():
                        biases.append(x.name)
                        continue
                    raise _Reject
                carried.append(x)
            return carried
        if op in RESHAPING:
            source = _required(node.inputs[0])
            if op == "Transpose":
                perm = node.attributes.get_ints("perm", None)
                if perm is None or perm[-1] != len(perm) - 1:
                    raise _Reject
            elif op != "Reshape" and _last_dim(source) != _last_dim(value):
                raise _Reject  # Unsqueeze/Squeeze/Expand must leave the channel axis as it is
            return [source]
        if op == "MatMul":
            a, b = _required(node.inputs[0]), _required(node.inputs[1])
            if b.const_value is not None or b.is_initializer():
                raise _Reject
            if _rank(b) is None or _rank(b) < 2:
                raise _Reject
            del a  # probabilities: contracted against b's second-to-last axis, not part of the group
            return [b]
        raise _Reject


def _required(value: ir.Value | None) -> ir.Value:
    if value is None:
        raise _Reject
    return value


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def _last_dim(value: ir.Value) -> int:
    """The static length of the last axis; rejects an unknown one."""
    shape = value.shape
    if shape is None and value.const_value is not None:
        shape = value.const_value.shape
    if shape is None or len(shape) == 0:
        raise _Reject
    dim = shape[-1]
    if not isinstance(dim, int):
        raise _Reject
    return dim


def _broadcast_only(constant: ir.Value) -> bool:
    """A constant that is the same for every channel: a scalar, or a last axis of length 1."""
    shape = constant.shape if constant.shape is not None else getattr(constant.const_value, "shape", None)
    if shape is None:
        return False
    return len(shape) == 0 or shape[-1] == 1


def _last_axis(value: ir.Value, axis: int) -> bool:
    rank = _rank(value)
    return axis == -1 or (rank is not None and axis == rank - 1)
