"""Find structured units in an ONNX graph: channels that producer and consumer weights share.

A *group* is a set of channels written by producer weights (their output axis, and their biases) and read by
consumer weights (their reduction axis K), with only channel-preserving ops between them: elementwise
activations (Relu, Gelu and its Erf/Tanh expansions, Sigmoid·x, Clip with scalar bounds, HardSwish), products and
sums of two such tensors (the SwiGLU gate ⊙ up, a squeeze-excitation scale), bias Adds, Cast, Identity,
BatchNormalization, per-channel pooling and spatial Resize of NCHW tensors, and depthwise convolutions
(``group`` = channels, one filter per channel: its weight and bias are sliced with the channels and its
``group`` attribute follows).
Removing channel ``j`` of a group means slicing index ``j`` out of every one of those tensors; the model then
computes the same thing as the original with those channels forced to zero.

Groups are grown from each producer by the coupling walker (:mod:`graphprune.graph.coupling`, with the op rules
of :mod:`graphprune.graph.op_rules`) until closed: every tensor in the region is produced by a producer weight or a
channel-preserving op, and read only by consumer weights or channel-preserving ops. Whatever the growth meets that
it cannot prove (a channel read by LayerNorm, a Reshape, a shared weight) ends the candidate with a
:class:`GroupSkip` and its reason, never a guess. Attention heads are found by the same walker under another
policy (:mod:`graphprune.graph.heads`) and returned in the same form.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import onnx_ir as ir

from graphprune.graph.coupling import (
    Layout,
    Policy,
    ShapeEntry,
    Slot,
    Unprovable,
    Walk,
    const_shape,
    consumer_slot,
    producer_slots,
    required,
    stored,
)
from graphprune.graph.op_rules import Flow

# The units' vocabulary, the walker's names included (shrink and the block finder import them from here).
__all__ = [
    "CHANNELS",
    "Group",
    "GroupScan",
    "GroupSkip",
    "ShapeEntry",
    "Slot",
    "Unprovable",
    "consumer_slot",
    "find_groups",
    "grow_group",
    "producer_slots",
    "slot_names",
    "stored",
]

# Shrink's channel units: elementwise and NCHW channel-wise ops, shapes checked where recorded (a channel never
# changes axis here, so no reshape has to be located and an unrecorded shape is no obstacle).
CHANNELS = Policy("channels", frozenset({Flow.UNARY, Flow.ELEMENTWISE, Flow.SPATIAL}))


def slot_names(slots: Iterable[Slot]) -> set[str]:
    """The names of the stored values ``slots`` edit (their weights, biases or norms)."""
    return {str(s.value.name) for s in slots}


@dataclass(kw_only=True)
class Group:
    """Channels shared by producer and consumer weights, removed ``unit_size`` at a time."""

    name: str
    kind: str  # "mlp" | "heads" | "channels"
    width: int  # number of units
    unit_size: int  # channels per unit along every slot (1 for neurons and filters; head_dim for heads)
    slots: list[Slot]
    shape_edits: list[ShapeEntry] = field(default_factory=list)
    # activations entering each consumer node, with the channel axis (negative) they carry the channels on
    consumer_inputs: list[tuple[ir.Node, ir.Value, int]] = field(default_factory=list)
    # values inside the region whose stored shape metadata changes with the width
    region: list[ir.Value] = field(default_factory=list)
    # per slot, a multiplier of the unit size (a GQA query projection holds several heads per unit)
    slot_unit_size: dict[int, int] = field(default_factory=dict)
    # depthwise Conv nodes inside the region: their ``group`` attribute equals the width
    depthwise: list[ir.Node] = field(default_factory=list)

    @property
    def producers(self) -> list[Slot]:
        return [s for s in self.slots if s.role == "producer"]

    @property
    def consumers(self) -> list[Slot]:
        return [s for s in self.slots if s.role == "consumer"]

    def unit_size_of(self, slot_index: int) -> int:
        return self.slot_unit_size.get(slot_index, self.unit_size)

    def parameters(self) -> int:
        shapes = [s.value.shape for s in _unique_slots(self.slots)]
        return sum(math.prod(int(d) for d in shape.numpy()) for shape in shapes if shape is not None)


@dataclass(frozen=True)
class GroupSkip:
    """A candidate group left untouched, and why."""

    name: str
    reason: str


@dataclass
class GroupScan:
    groups: list[Group]
    skips: list[GroupSkip]


def _unique_slots(slots: Iterable[Slot]) -> list[Slot]:
    seen: dict[int, Slot] = {}
    for s in slots:
        seen.setdefault(id(s.value), s)
    return list(seen.values())


def grow_group(seed: ir.Node) -> Walk:
    """Grow the region of channels that producer ``seed`` writes until it is closed (or raise Unprovable)."""
    found = producer_slots(seed)
    assert found is not None
    axis, slots = found
    weight, weight_axis = slots[0]
    walk = Walk(CHANNELS, const_shape(weight)[weight_axis]).grow([(seed.outputs[0], Layout(axis))])
    if not walk.consumers:
        raise Unprovable("no weight reads the channels")
    return walk


def find_groups(model: ir.Model, units: Iterable[str] = ("mlp", "heads", "channels")) -> GroupScan:
    """Every provable group of the main graph of the kinds in ``units``, and the candidates skipped with why."""
    wanted = set(units)
    groups: list[Group] = []
    skips: list[GroupSkip] = []
    claimed: set[ir.Node] = set()
    head_nodes: set[ir.Node] = set()
    if "heads" in wanted:
        from graphprune.graph.heads import find_head_groups

        head_scan = find_head_groups(model)
        groups += head_scan.groups
        skips += head_scan.skips
        for g in head_scan.groups:
            head_nodes |= {s.node for s in g.slots}
    for node in model.graph:
        found = producer_slots(node)
        if found is None or node in claimed or node in head_nodes:
            continue
        kind = "channels" if node.op_type == "Conv" else "mlp"
        name = f"output of {node.name or found[1][0][0].name or '?'}"
        try:
            walk = grow_group(node)
        except Unprovable as why:
            if kind in wanted:
                skips.append(GroupSkip(name, str(why)))
            continue
        claimed |= walk.producers
        if kind not in wanted:
            continue
        if walk.consumers & head_nodes or walk.producers & head_nodes:
            continue
        consumers = sorted(n.name or required(n.inputs[1]).name or "?" for n in walk.consumers)
        groups.append(
            Group(
                name=f"{kind} into {','.join(consumers)}",
                kind=kind,
                width=const_shape(found[1][0][0])[found[1][0][1]],
                unit_size=1,
                slots=walk.slots,
                consumer_inputs=walk.consumer_inputs,
                region=[v for v in walk.layout if v.const_value is None],
                depthwise=walk.depthwise,
            )
        )
    _dedupe_skips(skips)
    return GroupScan(groups, skips)


def _dedupe_skips(skips: list[GroupSkip]) -> None:
    seen: set[tuple[str, str]] = set()
    kept = []
    for s in skips:
        if (s.name, s.reason) not in seen:
            seen.add((s.name, s.reason))
            kept.append(s)
    skips[:] = kept
