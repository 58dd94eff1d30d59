"""Channel groups a permutation of K passes through exactly (the groups ``--permute`` reorders for N:M).

A *channel group* is a set of channels that some weights write (their output columns, and the biases added to
them) and one weight reads (its K rows), with only channel-preserving ops in between. Reordering the channels of
all of them together leaves every output of the model unchanged. Both kinds come from the coupling walker
(:mod:`graphprune.graph.coupling`):

* an MLP's intermediate channels (gate/up output columns with down's K rows; fc1 columns and bias with fc2's K
  rows): the groups of :func:`graphprune.graph.groups.find_groups` that one MatMul/Gemm weight reads;
* the channels inside each attention head (V's output columns with O's K rows): a *periodic* walk back from O's
  activation, through reshapes and transposes that keep the channel axis last and ``MatMul(P, V)``. Where a
  ``Reshape`` splits the channels into heads (``[.., H·d] -> [.., H, d]``) the permutation has to be the same in
  every block of d channels: the *period* of the group is the gcd of every channel-axis length on the way (the
  head size). Every tensor of the group must be read only inside the group, and every shape on the way known.

The residual stream (embeddings, norms) is not a group: a ``Gather`` or a ``ReduceMean`` ends both walks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx_ir as ir

from graphprune.graph.coupling import Layout, Policy, Slot, Unprovable, Walk, const_shape
from graphprune.graph.groups import find_groups
from graphprune.graph.op_rules import Flow
from graphprune.graph.targets import Target

# A periodic walk back from a reader: no Shape reads, no axis-wise ops (a permutation must stay invisible to them).
PERIODIC = Policy(
    "channels",
    frozenset({Flow.UNARY, Flow.ELEMENTWISE, Flow.RESHAPE, Flow.EXPAND, Flow.TRANSPOSE, Flow.MATMUL}),
    exact_shapes=True,
    periodic=True,
    follow_uses=False,
)


@dataclass(frozen=True, kw_only=True)
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


def find_permutation_groups(model: ir.Model, targets: list[Target]) -> dict[str, ChannelGroup]:
    """Every exact channel group of the main graph by reader name (shapes must be recorded for head groups)."""
    by_name = {t.name: t for t in targets}
    groups: dict[str, ChannelGroup] = {}
    values: dict[str, ir.Value] = dict(model.graph.initializers)
    values.update((str(v.name), v) for node in model.graph for v in node.outputs)  # the main graph only
    values.update((str(v.name), v) for v in model.graph.inputs)
    for t in targets:
        c = t.consumers[0]
        if len(t.consumers) != 1 or "DequantizeLinear" in t.through or c.op == "Conv" or c.in_subgraph:
            continue
        activation = values.get(c.activation)
        if activation is None or not _last_axis(activation, c.activation_axis):
            continue
        found = _head_group(t, activation, by_name)
        if found is not None and found.period < found.channels:
            groups[t.name] = found
    for group in find_groups(model, ("mlp",)).groups:
        readers = group.consumers
        mlp = _as_channel_group(readers[0], group.producers, group.slots, by_name) if len(readers) == 1 else None
        if mlp is not None:
            groups[mlp.reader] = mlp
    return groups


def _head_group(reader: Target, activation: ir.Value, targets: dict[str, Target]) -> ChannelGroup | None:
    """The periodic group that ``reader`` reads at ``activation``, or None where the walk cannot prove one."""
    try:
        walk = Walk(PERIODIC, None).grow([(activation, Layout(-1))])
    except Unprovable:
        return None
    for value in walk.layout:
        for use in value.uses():
            is_reader = value is activation and use.node.outputs[0].name == reader.consumers[0].output
            if use.node not in walk.nodes and not is_reader:
                return None
    producers = [s for s in walk.slots if s.role == "producer"]
    if not producers:
        return None
    group = _as_channel_group(reader, producers, walk.slots, targets)
    if group is None:
        return None
    period = math.gcd(*walk.lengths, reader.k)
    return ChannelGroup(
        reader=group.reader, writers=group.writers, biases=group.biases, channels=group.channels, period=period
    )


def _as_channel_group(
    reader: Slot | Target, producers: list[Slot], slots: list[Slot], targets: dict[str, Target]
) -> ChannelGroup | None:
    """Slots as a permutation group: one reader (a MatMul/Gemm weight read along its K), writers that are targets
    written along their output axis, and channel-wise constants along their last axis."""
    if isinstance(reader, Slot):
        target = targets.get(str(reader.value.name))
        if target is None or target.k_axis != reader.axis:
            return None
    else:
        target = reader
    if target.op not in ("MatMul", "Gemm"):
        return None
    writers = [targets.get(str(s.value.name)) for s in producers]
    if any(w is None or w.out_axis != s.axis for w, s in zip(writers, producers, strict=True)):
        return None
    biases = [s for s in slots if s.role == "channelwise"]
    if any(s.axis != len(const_shape(s.value)) - 1 for s in biases):
        return None
    names = tuple(sorted(w.name for w in writers if w is not None))
    return ChannelGroup(
        reader=target.name,
        writers=names,
        biases=tuple(sorted(str(s.value.name) for s in biases)),
        channels=target.k,
        period=target.k,
    )


def _last_axis(value: ir.Value, axis: int) -> bool:
    rank = None if value.shape is None else len(value.shape)
    return axis == -1 or (rank is not None and axis == rank - 1)
