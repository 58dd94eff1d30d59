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

Groups are found by growing a region of tensors from each producer until it is closed: every tensor in it is
produced by a producer weight or a channel-preserving op, and read only by consumer weights or channel-preserving
ops. Whatever the growth meets that it cannot prove (a channel read by LayerNorm, a Reshape, a shared weight) ends
the candidate with a :class:`GroupSkip` and its reason, never a guess. Attention heads are found separately by
:mod:`graphprune.graph.heads` and returned in the same form.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

# Ops whose single output keeps every channel where its input had it, whatever the channel axis.
CHANNELWISE_UNARY = frozenset(
    {
        "Relu",
        "Gelu",
        "Erf",
        "Tanh",
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "Swish",
        "Mish",
        "Elu",
        "Selu",
        "Celu",
        "LeakyRelu",
        "Softplus",
        "Softsign",
        "Exp",
        "Neg",
        "Abs",
        "Cast",
        "Identity",
        "Dropout",
    }
)
# Elementwise binary ops: channel-preserving when each input carries the channels or broadcasts over them.
ELEMENTWISE_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow"})
# Pooling over the spatial axes of an NCHW tensor: output channel c reads input channel c only (axis 1).
CHANNELWISE_POOLS = frozenset(
    {"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "AveragePool", "MaxPool", "LpPool"}
)


class Unprovable(Exception):
    """The coupling of a candidate group cannot be proved; the message is the reason."""


@dataclass(frozen=True)
class Slot:
    """One stored tensor axis that carries the group's channels.

    ``role`` is ``producer`` (a weight's output axis), ``consumer`` (a weight's K axis) or ``channelwise`` (a
    bias, a BatchNormalization parameter, a per-channel constant). ``node`` is the node that reads it.
    """

    value: ir.Value
    axis: int  # non-negative axis of the stored tensor
    role: str
    node: ir.Node


@dataclass(frozen=True)
class ShapeEntry:
    """Entry ``position`` of the target shape of a Reshape/Expand ``node`` that equals ``units x per``."""

    node: ir.Node
    position: int
    per: int


@dataclass
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
        return sum(int(np.prod(s.value.shape.numpy())) for s in _unique_slots(self.slots))


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


def stored(value: ir.Value | None) -> bool:
    """A constant the pass may rewrite: an initializer that is not also a graph input."""
    return (
        value is not None
        and value.const_value is not None
        and value.is_initializer()
        and not value.is_graph_input()
        and not value.is_graph_output()
    )


def _attr(node: ir.Node, name: str, default: int) -> int:
    a = node.attributes.get(name)
    return int(a.value) if a is not None else default


def _const_shape(value: ir.Value) -> tuple[int, ...]:
    assert value.const_value is not None
    return tuple(int(d) for d in value.const_value.shape)


def producer_slots(node: ir.Node) -> tuple[int, list[tuple[ir.Value, int]]] | None:
    """When ``node`` writes channels from a stored weight: the output channel axis and (weight, axis) slots."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return None
    if (
        op == "MatMul"
        and len(node.inputs) == 2
        and stored(node.inputs[1])
        and len(_const_shape(node.inputs[1])) == 2
    ):
        return -1, [(node.inputs[1], 1)]  # type: ignore[list-item]
    if op == "Gemm" and stored(node.inputs[1]):
        slots = [(node.inputs[1], 0 if _attr(node, "transB", 0) else 1)]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = node.inputs[2]
            if not stored(bias):
                return None
            shape = _const_shape(bias)
            if len(shape) >= 1 and shape[-1] > 1 and all(d == 1 for d in shape[:-1]):
                slots.append((bias, len(shape) - 1))
            elif any(d != 1 for d in shape):
                return None
        return -1, slots  # type: ignore[return-value]
    if op == "Conv" and stored(node.inputs[1]) and _attr(node, "group", 1) == 1:
        rank = len(_const_shape(node.inputs[1]))
        slots = [(node.inputs[1], 0)]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            if not stored(node.inputs[2]):
                return None
            slots.append((node.inputs[2], 0))
        return -(rank - 1), slots  # type: ignore[return-value]
    return None


def consumer_slot(node: ir.Node, index: int) -> tuple[int, ir.Value, int] | None:
    """When input ``index`` of ``node`` is multiplied by a stored weight along K: (activation axis, weight, K)."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx") or index != 0:
        return None
    if op == "MatMul" and stored(node.inputs[1]) and len(_const_shape(node.inputs[1])) == 2:
        return -1, node.inputs[1], 0  # type: ignore[return-value]
    if op == "Gemm" and stored(node.inputs[1]) and not _attr(node, "transA", 0):
        return -1, node.inputs[1], 1 if _attr(node, "transB", 0) else 0  # type: ignore[return-value]
    if op == "Conv" and stored(node.inputs[1]) and _attr(node, "group", 1) == 1:
        return -(len(_const_shape(node.inputs[1])) - 1), node.inputs[1], 1  # type: ignore[return-value]
    return None


def depthwise_slots(node: ir.Node) -> list[tuple[ir.Value, int]] | None:
    """When ``node`` is a depthwise Conv (one filter per channel, ``group`` = channels): its weight and bias, each
    sliced along axis 0 with the channels."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or not stored(node.inputs[1]):
        return None
    shape = _const_shape(node.inputs[1])  # type: ignore[arg-type]
    groups = _attr(node, "group", 1)
    if groups < 2 or shape[0] != groups or shape[1] != 1:
        return None  # an ordinary or grouped Conv, or a depthwise Conv with a channel multiplier
    slots = [(node.inputs[1], 0)]
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        if not stored(node.inputs[2]):
            return None
        slots.append((node.inputs[2], 0))
    return slots  # type: ignore[return-value]


def _channelwise_reader(node: ir.Node, index: int) -> bool:
    """Whether input ``index`` of ``node`` may carry channels into a channel-preserving op."""
    op = node.op_type
    if op in CHANNELWISE_UNARY | ELEMENTWISE_BINARY:
        return True
    if op in ("BatchNormalization", "Clip") or op in CHANNELWISE_POOLS:
        return index == 0
    if op == "Resize":
        return index == 0 and _resize_keeps_channels(node)
    return op == "Conv" and index == 0 and depthwise_slots(node) is not None


def _resize_keeps_channels(node: ir.Node) -> bool:
    """A Resize scales only the spatial axes of an NCHW tensor: constant scales with 1 for the batch and the
    channels, nearest or linear sampling (at scale 1 every coordinate mode maps channel c to c), no ``axes``."""
    if node.op_type != "Resize" or "axes" in node.attributes or len(node.inputs) < 3:
        return False
    mode = node.attributes["mode"].value if "mode" in node.attributes else "nearest"
    transform = node.attributes.get("coordinate_transformation_mode")
    if mode not in ("nearest", "linear") or (transform is not None and transform.value == "tf_crop_and_resize"):
        return False
    scales = node.inputs[2]
    if scales is None or scales.const_value is None or (len(node.inputs) > 3 and node.inputs[3] is not None):
        return False
    values = scales.const_value.numpy().reshape(-1)
    return len(values) >= 2 and values[0] == 1 and values[1] == 1


def _nchw_channel_axis(node: ir.Node, axis: int) -> None:
    """Pooling and depthwise convolution see channels on axis 1 only: check ``axis`` is that axis."""
    x = node.inputs[0]
    rank = x.shape.rank() if x is not None and x.shape is not None else None
    if rank is None:
        raise Unprovable(f"{_label(node)} reads a tensor of unknown rank")
    if rank + axis != 1:
        raise Unprovable(f"{_label(node)} reads the channels on axis {rank + axis}, not 1")


def _label(node: ir.Node) -> str:
    return f"{node.op_type} {node.name}" if node.name else node.op_type


class _Region:
    """A growing set of tensors that carry one group's channels, each on a known (negative) axis."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.axis: dict[ir.Value, int] = {}
        self.nodes: set[ir.Node] = set()
        self.slots: list[Slot] = []
        self.consumer_inputs: list[tuple[ir.Node, ir.Value, int]] = []
        self.queue: list[ir.Value] = []
        self.producers: set[ir.Node] = set()
        self.consumers: set[ir.Node] = set()
        self.depthwise: list[ir.Node] = []

    def add(self, value: ir.Value, axis: int) -> None:
        if value in self.axis:
            if self.axis[value] != axis:
                raise Unprovable(f"tensor {value.name} carries the channels on two different axes")
            return
        if value.shape is not None and value.shape.rank() >= -axis:
            dim = value.shape[axis]
            if isinstance(dim, int) and dim != self.width:
                raise Unprovable(f"tensor {value.name} has {dim} channels, expected {self.width}")
        self.axis[value] = axis
        self.queue.append(value)

    def slot(self, value: ir.Value, axis: int, role: str, node: ir.Node) -> None:
        shape = _const_shape(value)
        if shape[axis] != self.width:
            raise Unprovable(
                f"{role} tensor {value.name} has {shape[axis]} channels on axis {axis}, not {self.width}"
            )
        users = {u.node for u in value.uses()}
        if users - {node}:
            raise Unprovable(f"{role} tensor {value.name} is shared with {_label(next(iter(users - {node})))}")
        if not any(s.value is value for s in self.slots):
            self.slots.append(Slot(value, axis, role, node))


def _broadcast_axis(value: ir.Value, axis: int, width: int) -> str:
    """How a side input of an elementwise op meets a channel axis: "scalar", "channel" or "unknown"."""
    shape: tuple[int | None, ...] | None
    if value.const_value is not None:
        shape = _const_shape(value)
    elif value.shape is not None:
        shape = tuple(d if isinstance(d, int) else None for d in value.shape.dims)
    else:
        return "unknown"
    if len(shape) < -axis:
        return "scalar"  # broadcasting prepends 1s: the channel axis is not there
    dim = shape[axis]
    if dim == 1:
        return "scalar"
    if dim == width:
        return "channel"
    return "unknown"


def _step_through(region: _Region, node: ir.Node, axis: int) -> None:
    """Add a channel-preserving node's inputs and output to ``region`` (or raise Unprovable)."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        raise Unprovable(f"channels pass through {_label(node)} (custom domain)")
    region.nodes.add(node)
    if op in CHANNELWISE_UNARY:
        if op == "Dropout" and len(node.outputs) > 1 and node.outputs[1].uses():
            raise Unprovable(f"the mask of {_label(node)} is read")
        region.add(node.inputs[0], axis)  # type: ignore[arg-type]
        region.add(node.outputs[0], axis)
        return
    if op in ELEMENTWISE_BINARY:
        for i, inp in enumerate(node.inputs):
            assert inp is not None
            if inp in region.axis:
                continue
            kind = _broadcast_axis(inp, axis, region.width)
            if op == "Pow" and i == 1 and kind != "scalar":
                raise Unprovable(f"the exponent of {_label(node)} is not a scalar constant")
            if inp.const_value is not None:
                if kind == "scalar":
                    continue
                if kind == "channel" and stored(inp):
                    region.slot(inp, len(_const_shape(inp)) + axis, "channelwise", node)
                    continue
                raise Unprovable(f"constant {inp.name} of {_label(node)} does not broadcast per channel")
            if kind == "scalar":
                continue  # e.g. a per-token scale [B, S, 1]
            region.add(inp, axis)
        region.add(node.outputs[0], axis)
        return
    if op == "Clip":
        for bound in node.inputs[1:]:
            if bound is not None and (bound.const_value is None or bound.const_value.size != 1):
                raise Unprovable(f"a bound of {_label(node)} is not a scalar constant")
        region.add(node.inputs[0], axis)  # type: ignore[arg-type]
        region.add(node.outputs[0], axis)
        return
    spatial = op in CHANNELWISE_POOLS or (op == "Resize" and _resize_keeps_channels(node))
    if spatial or (op == "Conv" and depthwise_slots(node) is not None):
        _nchw_channel_axis(node, axis)
        if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
            raise Unprovable(f"the indices of {_label(node)} are read")
        if op == "Conv":
            for weight, waxis in depthwise_slots(node):  # type: ignore[union-attr]
                region.slot(weight, waxis, "channelwise", node)
            region.depthwise.append(node)
        region.add(node.inputs[0], axis)  # type: ignore[arg-type]
        region.add(node.outputs[0], axis)
        return
    if op == "BatchNormalization":
        if len(node.outputs) > 1 and any(o.uses() for o in node.outputs[1:]):
            raise Unprovable(f"{_label(node)} returns running statistics")
        for p in node.inputs[1:]:
            if not stored(p):
                raise Unprovable(f"{_label(node)} has a parameter that is not a stored constant")
            region.slot(p, 0, "channelwise", node)  # type: ignore[arg-type]
        region.add(node.inputs[0], axis)  # type: ignore[arg-type]
        region.add(node.outputs[0], axis)
        return
    raise Unprovable(f"channels pass through {_label(node)}")


def grow_group(seed: ir.Node) -> _Region:
    """Grow the region of channels that producer ``seed`` writes until it is closed (or raise Unprovable)."""
    found = producer_slots(seed)
    assert found is not None
    axis, _ = found
    width = _const_shape(found[1][0][0])[found[1][0][1]]
    region = _Region(width)
    region.add(seed.outputs[0], axis)
    while region.queue:
        value = region.queue.pop()
        axis = region.axis[value]
        if value.is_graph_output():
            raise Unprovable(f"tensor {value.name} is a model output")
        node = value.producer()
        if node is None:
            raise Unprovable(f"channels come from model input {value.name}")
        if node not in region.nodes and node not in region.producers:
            made = producer_slots(node)
            if made is not None and made[0] == axis and value is node.outputs[0]:
                region.producers.add(node)
                for j, (weight, waxis) in enumerate(made[1]):
                    region.slot(weight, waxis, "channelwise" if j else "producer", node)
            else:
                _step_through(region, node, axis)
        for use in value.uses():
            user, index = use.node, use.idx
            if user in region.nodes or (user in region.consumers and index == 0):
                continue
            read = consumer_slot(user, index)
            if read is not None:
                if read[0] != axis:
                    raise Unprovable(f"{_label(user)} reads the channels on another axis")
                region.consumers.add(user)
                region.slot(read[1], read[2], "consumer", user)
                region.consumer_inputs.append((user, value, axis))
                continue
            if _channelwise_reader(user, index):
                _step_through(region, user, axis)
                continue
            if index and user.op_type in ("BatchNormalization", "Clip", "Conv"):
                raise Unprovable(f"channels feed a parameter of {_label(user)}")
            raise Unprovable(f"channels are read by {_label(user)}")
    if not region.consumers:
        raise Unprovable("no weight reads the channels")
    return region


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
            region = grow_group(node)
        except Unprovable as why:
            if kind in wanted:
                skips.append(GroupSkip(name, str(why)))
            continue
        claimed |= region.producers
        if kind not in wanted:
            continue
        if region.consumers & head_nodes or region.producers & head_nodes:
            continue
        consumers = sorted(n.name or n.inputs[1].name or "?" for n in region.consumers)  # type: ignore[union-attr]
        groups.append(
            Group(
                name=f"{kind} into {','.join(consumers)}",
                kind=kind,
                width=region.width,
                unit_size=1,
                slots=region.slots,
                consumer_inputs=region.consumer_inputs,
                region=[v for v in region.axis if v.const_value is None],
                depthwise=region.depthwise,
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
