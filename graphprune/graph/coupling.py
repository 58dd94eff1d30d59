"""One walker that proves channel coupling: which stored tensors share the channels of a tensor, along which axis.

A walk grows a *region* of tensors from a seed, each with the :class:`Layout` it carries the channels in, until the
region is closed: every tensor is written by a producer weight (its output axis) or by an op of
:mod:`graphprune.graph.op_rules` from region tensors, and read only by consumer weights (their K axis) or by such
ops. On the way it records the *slots* (stored tensor axes that carry the channels: producers, consumers,
biases and other per-channel constants), the entries of target shapes that count them, and the depthwise Convs
whose ``group`` follows them. Whatever the walk meets that it cannot prove ends it with :class:`Unprovable` and a
reason, never a guess.

Its clients differ only in their :class:`Policy` (which kinds of op they can rewrite, how strictly shapes must be
recorded) and in how they read the region: shrink's units (:mod:`~graphprune.graph.groups`), attention heads
(:mod:`~graphprune.graph.heads`), channel permutations (:mod:`~graphprune.graph.channel_groups`) and SmoothQuant's
scale folds (:mod:`~graphprune.graph.scale_folds`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeGuard

import numpy as np
import onnx_ir as ir

from graphprune.graph.op_rules import RULES, Flow, OpRule, data_inputs, rule_of


class Unprovable(Exception):
    """The coupling of a candidate group cannot be proved; the message is the reason."""


class Coarser(Exception):
    """The unit must be ``factor`` times larger (a reshape splits it: a KV group rather than a head)."""

    def __init__(self, factor: int) -> None:
        super().__init__(f"the unit must be {factor} times larger")
        self.factor = factor


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


@dataclass(frozen=True)
class Layout:
    """Where a tensor carries the channels: a negative ``axis``, each unit spanning ``per`` entries of it."""

    axis: int
    per: int = 1


@dataclass(frozen=True)
class Policy:
    """What a client can rewrite: the op flows it follows, and how strictly shapes must be recorded."""

    what: str  # the noun of the reasons: "channels", "heads"
    flows: frozenset[Flow]
    # every tensor's channel axis must be recorded with its exact length (a reshape is located by shapes alone)
    exact_shapes: bool = False
    # the unit count is free: the walk records each channel-axis length (a permutation's period is their gcd);
    # the channels stay on the last axis, where a reshape splitting them keeps a periodic permutation exact
    periodic: bool = False
    # False: only producers are walked back; the caller checks every use of the region ends inside it
    follow_uses: bool = True


STANDARD = frozenset({"", "ai.onnx"})


def stored(value: ir.Value | None) -> TypeGuard[ir.Value]:
    """A constant the pass may rewrite: an initializer that is not also a graph input."""
    return (
        value is not None
        and value.const_value is not None
        and value.is_initializer()
        and not value.is_graph_input()
        and not value.is_graph_output()
    )


def required(value: ir.Value | None) -> ir.Value:
    """An input the op cannot run without (a data input, present in every valid model)."""
    assert value is not None
    return value


def _attr(node: ir.Node, name: str, default: int) -> int:
    a = node.attributes.get(name)
    return int(a.value) if a is not None else default


def const_shape(value: ir.Value) -> tuple[int, ...]:
    assert value.const_value is not None
    return tuple(int(d) for d in value.const_value.shape.numpy())


def label(node: ir.Node) -> str:
    return f"{node.op_type} {node.name}" if node.name else node.op_type


def _weight(node: ir.Node) -> ir.Value | None:
    """Input 1 of a standard-domain node when it is a stored tensor (a MatMul/Gemm B, a Conv weight)."""
    weight = node.inputs[1] if node.domain in STANDARD and len(node.inputs) > 1 else None
    return weight if stored(weight) else None


def producer_slots(node: ir.Node) -> tuple[int, list[tuple[ir.Value, int]]] | None:
    """When ``node`` writes channels from a stored weight: the output channel axis and (weight, axis) slots."""
    op, weight = node.op_type, _weight(node)
    if weight is None:
        return None
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and not stored(bias):
        return None
    if op == "MatMul" and len(node.inputs) == 2 and len(const_shape(weight)) == 2:
        return -1, [(weight, 1)]
    if op == "Gemm":
        slots = [(weight, 0 if _attr(node, "transB", 0) else 1)]
        if bias is not None:
            shape = const_shape(bias)
            if len(shape) >= 1 and shape[-1] > 1 and all(d == 1 for d in shape[:-1]):
                slots.append((bias, len(shape) - 1))
            elif any(d != 1 for d in shape):
                return None
        return -1, slots
    if op == "Conv" and _attr(node, "group", 1) == 1:
        return -(len(const_shape(weight)) - 1), [(weight, 0)] + ([(bias, 0)] if bias is not None else [])
    return None


def consumer_slot(node: ir.Node, index: int) -> tuple[int, ir.Value, int] | None:
    """When input ``index`` of ``node`` is multiplied by a stored weight along K: (activation axis, weight, K)."""
    op, weight = node.op_type, _weight(node)
    if weight is None or index != 0:
        return None
    if op == "MatMul" and len(const_shape(weight)) == 2:
        return -1, weight, 0
    if op == "Gemm" and not _attr(node, "transA", 0):
        return -1, weight, 1 if _attr(node, "transB", 0) else 0
    if op == "Conv" and _attr(node, "group", 1) == 1:
        return -(len(const_shape(weight)) - 1), weight, 1
    return None


def dims(value: ir.Value) -> list[int | str] | None:
    """Recorded dimensions: ints, or names of symbolic dims (None when the shape is unknown); an unnamed dim is
    equal to nothing else."""
    if value.const_value is not None:
        return list(const_shape(value))
    if value.shape is None:
        return None
    out: list[int | str] = []
    for d in value.shape.dims:
        if isinstance(d, int):
            out.append(d)
        elif getattr(d, "value", None):
            out.append(str(d.value))
        else:
            out.append(f"?{id(value)}:{len(out)}")
    return out


def uniform(value: ir.Value, layout: Layout) -> bool:
    """Whether ``value`` is the same for every channel when broadcast against a tensor of ``layout``."""
    shape = dims(value)
    return shape is not None and (len(shape) < -layout.axis or shape[layout.axis] == 1)


def _norm_axis(axis: int, value: ir.Value) -> int:
    rank = len(dims(value) or [])
    return axis - rank if axis >= 0 else axis


class Walk:
    """A region of tensors that carry one group's channels (see the module docstring).

    ``units`` is the number of units the channel axis holds (``units x per`` entries); None for a periodic walk.
    """

    def __init__(self, policy: Policy, units: int | None) -> None:
        self.policy = policy
        self.units = units
        self.layout: dict[ir.Value, Layout] = {}
        self.nodes: set[ir.Node] = set()  # ops stepped through (not the weights' nodes)
        self.producers: set[ir.Node] = set()
        self.consumers: set[ir.Node] = set()
        self.slots: list[Slot] = []
        self.slot_per: list[int] = []  # entries of each slot's axis one unit spans
        self.consumer_inputs: list[tuple[ir.Node, ir.Value, int]] = []
        self.shape_edits: list[ShapeEntry] = []
        self.depthwise: list[ir.Node] = []
        self.lengths: list[int] = []  # periodic: every channel-axis length met
        self._queue: list[ir.Value] = []

    # -- growth ----------------------------------------------------------------------------------------------
    def grow(self, seeds: list[tuple[ir.Value, Layout]]) -> Walk:
        """Close the region from ``seeds`` (or raise Unprovable / Coarser); returns self."""
        for value, layout in seeds:
            self.add(value, layout)
        while self._queue:
            value = self._queue.pop()
            if value.is_graph_output():
                raise Unprovable(f"tensor {value.name} is a model output")
            node = value.producer()
            if node is None:
                raise Unprovable(f"{self.policy.what} come from model input {value.name}")
            if node not in self.nodes and node not in self.producers:
                self._back(node, value)
            if self.policy.follow_uses:
                for use in value.uses():
                    if use.node not in self.nodes and not (use.node in self.consumers and use.idx == 0):
                        self._forward(use.node, use.idx, value)
        return self

    def add(self, value: ir.Value, layout: Layout) -> None:
        """Put ``value`` in the region with ``layout`` (checking what the policy asks of its recorded shape)."""
        if value in self.layout:
            if self.layout[value] != layout:
                raise Unprovable(f"tensor {value.name} carries the {self.policy.what} on two different axes")
            return
        if value.const_value is not None:
            raise Unprovable(f"constant {value.name} would need slicing with the {self.policy.what}")
        shape = dims(value)
        if self.policy.periodic:
            if layout.axis != -1:
                raise Unprovable(f"tensor {value.name} carries the channels off its last axis")
            if shape is None or not shape or not isinstance(shape[-1], int):
                raise Unprovable(f"tensor {value.name} has no recorded channel count")
            self.lengths.append(shape[-1])
        elif self.policy.exact_shapes:
            assert self.units is not None
            if shape is None:
                raise Unprovable(f"tensor {value.name} has no recorded shape")
            if len(shape) < -layout.axis or shape[layout.axis] != self.units * layout.per:
                raise Unprovable(
                    f"tensor {value.name} does not have {self.units * layout.per} entries on its axis"
                )
        elif shape is not None and len(shape) >= -layout.axis:
            dim = shape[layout.axis]
            if isinstance(dim, int) and dim != self.units:
                raise Unprovable(f"tensor {value.name} has {dim} channels, expected {self.units}")
        self.layout[value] = layout
        self._queue.append(value)

    def slot(self, value: ir.Value, axis: int, role: str, node: ir.Node, per: int = 1) -> None:
        """Record stored ``value`` as carrying the channels on (non-negative) ``axis``, read only by ``node``."""
        size = const_shape(value)[axis]
        if self.policy.periodic:
            self.lengths.append(size)
        elif size != (self.units or 0) * per:
            raise Unprovable(f"{role} tensor {value.name} has {size} channels on axis {axis}, not {self.units}")
        users = {u.node for u in value.uses()} - {node}
        if users:
            raise Unprovable(f"{role} tensor {value.name} is shared with {label(next(iter(users)))}")
        if not any(s.value is value for s in self.slots):
            self.slots.append(Slot(value, axis, role, node))
            self.slot_per.append(per)

    def _back(self, node: ir.Node, value: ir.Value) -> None:
        """``value`` (in the region) is an output of ``node``: a producer weight, or an op to step through."""
        layout = self.layout[value]
        made = producer_slots(node)
        if made is not None and made[0] == layout.axis and value is node.outputs[0]:
            self.producers.add(node)
            for j, (weight, axis) in enumerate(made[1]):
                self.slot(weight, axis, "channelwise" if j else "producer", node, layout.per)
            return
        self._step(node, value, None)

    def _forward(self, node: ir.Node, index: int, value: ir.Value) -> None:
        """``value`` (in the region) is input ``index`` of ``node``: a consumer weight, or an op to step
        through."""
        layout = self.layout[value]
        read = consumer_slot(node, index)
        if read is not None:
            if read[0] != layout.axis:
                raise Unprovable(f"{label(node)} reads the {self.policy.what} on another axis")
            self.consumers.add(node)
            self.slot(read[1], read[2], "consumer", node, layout.per)
            self.consumer_inputs.append((node, value, layout.axis))
            return
        self._step(node, value, index)

    # -- one op ----------------------------------------------------------------------------------------------
    def _step(self, node: ir.Node, via: ir.Value, index: int | None) -> None:
        """Follow the channels through ``node``, reached through region tensor ``via``: input ``index`` of it,
        or (``index`` None) its output."""
        what = self.policy.what
        if node.domain not in STANDARD:
            raise Unprovable(f"{what} pass through {label(node)} (custom domain)")
        base = RULES.get(node.op_type)
        if index is not None and base is not None and index not in data_inputs(node, base):
            raise Unprovable(f"{what} feed a parameter of {label(node)}")
        rule = rule_of(node)
        if rule is None or rule.flow not in self.policy.flows:
            raise Unprovable(f"{what} {'pass through' if index is None else 'are read by'} {label(node)}")
        if index is None and via is not node.outputs[0]:
            raise Unprovable(f"{what} come from a second output of {label(node)}")
        if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
            raise Unprovable(f"a second output of {label(node)} is read")
        self.nodes.add(node)
        layout = self.layout[via]
        for i in rule.uniform:
            side = node.inputs[i] if i < len(node.inputs) else None
            if side is not None and side not in self.layout and not uniform(side, layout):
                raise Unprovable(f"input {i} of {label(node)} varies along the {what}")
        FLOWS[rule.flow](self, node, rule, via, index is not None)

    def carry(self, node: ir.Node, value: ir.Value, layout: Layout) -> None:
        """A data input of ``node`` broadcast against the channels: uniform, a per-channel constant, or carried."""
        if value in self.layout or uniform(value, layout):
            return
        if value.const_value is not None:
            if not stored(value):
                raise Unprovable(f"constant {value.name} of {label(node)} does not broadcast per channel")
            self.slot(value, len(const_shape(value)) + layout.axis, "channelwise", node, layout.per)
            return
        self.add(value, layout)


def _unary(walk: Walk, node: ir.Node, rule: OpRule, via: ir.Value, forward: bool) -> None:
    layout = walk.layout[via]
    walk.add(required(node.inputs[0]), layout)
    walk.add(node.outputs[0], layout)


def _elementwise(walk: Walk, node: ir.Node, rule: OpRule, via: ir.Value, forward: bool) -> None:
    layout = walk.layout[via]
    for i in data_inputs(node, rule):
        walk.carry(node, required(node.inputs[i]), layout)
    walk.add(node.outputs[0], layout)


def _spatial(walk: Walk, node: ir.Node, rule: OpRule, via: ir.Value, forward: bool) -> None:
    """NCHW ops see the channels on axis 1 only; their per-channel parameters are sliced along axis 0."""
    layout = walk.layout[via]
    shape = dims(required(node.inputs[0]))
    if shape is None and rule.needs_rank:
        raise Unprovable(f"{label(node)} reads a tensor of unknown rank")
    if shape is not None and len(shape) + layout.axis != 1:
        raise Unprovable(f"{label(node)} reads the channels on axis {len(shape) + layout.axis}, not 1")
    for i in rule.per_channel:
        param = node.inputs[i] if i < len(node.inputs) else None
        if param is None:
            continue
        if not stored(param):
            raise Unprovable(f"{label(node)} has a parameter that is not a stored constant")
        walk.slot(param, 0, "channelwise", node, layout.per)
    if node.op_type == "Conv":
        walk.depthwise.append(node)
    walk.add(required(node.inputs[0]), layout)
    walk.add(node.outputs[0], layout)


def _reshape(walk: Walk, node: ir.Node, rule: OpRule, via: ir.Value, forward: bool) -> None:
    """Reshape/Unsqueeze/Squeeze/Expand: where the channel axis lands, located by the recorded shapes."""
    src, dst = node.inputs[0], node.outputs[0]
    assert src is not None
    known, other = (src, dst) if forward else (dst, src)
    dims_known, dims_other = dims(known), dims(other)
    if dims_known is None or dims_other is None:
        raise Unprovable(f"{label(node)} has no recorded shapes")
    layout = walk.layout[known]
    if walk.policy.periodic:  # a Reshape may split the last axis (the period shrinks); the others must keep it
        if node.op_type != "Reshape" and dims_known[-1] != dims_other[-1]:
            raise Unprovable(f"{label(node)} changes the channel axis")
        walk.add(other, Layout(-1))
        return
    assert walk.units is not None
    if rule.flow is Flow.EXPAND:
        if len(dims_known) != len(dims_other) or dims_known[layout.axis] != dims_other[layout.axis]:
            raise Unprovable(f"{label(node)} broadcasts the {walk.policy.what} axis")
        walk.add(other, layout)
    else:
        walk.add(other, map_reshape(dims_known, dims_other, layout, walk.units))
    if node.op_type in ("Reshape", "Expand"):
        out = walk.layout[dst]
        position = len(dims_other if forward else dims_known) + out.axis
        entry = target_entry(node, position)
        if entry == walk.units * out.per:
            walk.shape_edits.append(ShapeEntry(node, position, out.per))
        elif not (entry == -1 and node.op_type == "Reshape") and not (entry == 1 and node.op_type == "Expand"):
            raise Unprovable(f"{label(node)} has a target shape it cannot rewrite")


def _transpose(walk: Walk, node: ir.Node, rule: OpRule, via: ir.Value, forward: bool) -> None:
    perm = node.attributes.get_ints("perm", None)
    if perm is None:
        raise Unprovable(f"{label(node)} has no perm")
    rank, layout = len(perm), walk.layout[via]
    if forward:
        walk.add(node.outputs[0], Layout(list(perm).index(rank + layout.axis) - rank, layout.per))
    else:
        walk.add(required(node.inputs[0]), Layout(perm[rank + layout.axis] - rank, layout.per))


def _matmul(walk: Walk, node: ir.Node, rule: OpRule, via: ir.Value, forward: bool) -> None:
    """A product of two activations: a batch axis is shared by A, B and Y; A's rows are Y's rows, B's columns
    Y's columns; K (A's last axis, B's second to last) is summed over and cannot carry the channels."""
    a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
    assert a is not None and b is not None
    ranks = [len(d) if (d := dims(v)) is not None else 0 for v in (a, b)]
    if min(ranks) < 2:
        raise Unprovable(f"{label(node)} multiplies tensors of unknown or vector shape")
    axis = walk.layout[via].axis
    role = (
        "batch"
        if axis <= -3
        else {(a, -2): "rows", (b, -1): "columns", (y, -2): "rows", (y, -1): "columns"}.get((via, axis))
    )
    if role is None:
        raise Unprovable(f"{label(node)} multiplies along the {walk.policy.what} axis")
    layout = walk.layout[via]
    if role == "batch":
        walk.carry(node, a, layout)
        walk.carry(node, b, layout)
    else:
        walk.add(a if role == "rows" else b, layout)
    walk.add(y, layout)


def _along_axis(walk: Walk, node: ir.Node, rule: OpRule, via: ir.Value, forward: bool) -> None:
    """Softmax, Slice and Concat act along one axis; any axis but the channels' keeps them apart."""
    layout = walk.layout[via]
    if node.op_type == "Slice":
        axes = node.inputs[3] if len(node.inputs) > 3 else None
        if axes is None or axes.const_value is None:
            raise Unprovable(f"{label(node)} may cut the {walk.policy.what} axis")
        acted = [int(x) for x in axes.const_value.numpy().reshape(-1)]
    else:
        acted = [node.attributes["axis"].value if "axis" in node.attributes else -1]
    if any(_norm_axis(x, via) == layout.axis for x in acted):
        raise Unprovable(f"{label(node)} acts along the {walk.policy.what} axis")
    for i in data_inputs(node, rule):
        walk.add(required(node.inputs[i]), layout)
    walk.add(node.outputs[0], layout)


def _shape(walk: Walk, node: ir.Node, rule: OpRule, via: ir.Value, forward: bool) -> None:
    """A Shape of a region tensor is harmless when only entries other than the channel count are picked."""
    rank = len(dims(via) or [])
    axis = rank + walk.layout[via].axis
    if "start" in node.attributes or "end" in node.attributes:
        raise Unprovable(f"{label(node)} takes a range of a shape")
    for use in node.outputs[0].uses():
        user = use.node
        consts = [
            v.const_value.numpy().reshape(-1)
            for v in user.inputs[1:]
            if v is not None and v.const_value is not None
        ]
        known = use.idx == 0 and len(consts) == len(user.inputs) - 1  # every index a constant
        if user.op_type == "Gather" and known and consts:
            picked = {int(i) % rank for i in consts[0]}
        elif user.op_type == "Slice" and known and len(consts) >= 2:
            start, end = (int(np.clip(c[0] + rank if c[0] < 0 else c[0], 0, rank)) for c in consts[:2])
            step = int(consts[3][0]) if len(consts) > 3 else 1
            picked = set(range(start, end, step))
        else:
            raise Unprovable(f"a shape of the {walk.policy.what} is read by {label(user)}")
        if axis in picked:
            raise Unprovable(f"{label(user)} reads the {walk.policy.what} count from a shape")


FLOWS = {
    Flow.UNARY: _unary,
    Flow.ELEMENTWISE: _elementwise,
    Flow.SPATIAL: _spatial,
    Flow.RESHAPE: _reshape,
    Flow.EXPAND: _reshape,
    Flow.TRANSPOSE: _transpose,
    Flow.MATMUL: _matmul,
    Flow.ALONG_AXIS: _along_axis,
    Flow.SHAPE: _shape,
}


def map_reshape(src: list[int | str], dst: list[int | str], layout: Layout, units: int) -> Layout:
    """Where a channel axis of ``src`` lands in ``dst`` when a reshape turns one into the other.

    The axes both shapes share at the front and back are kept; in the middle, the unit's block of entries
    (``per`` times the inner axes) must land whole on one axis. A reshape that splits a unit raises Unprovable,
    or :class:`Coarser` when a larger unit would land whole (a KV group of several query heads).
    """
    a = len(src) + layout.axis
    pre = 0
    while pre < min(len(src), len(dst)) and src[pre] == dst[pre] and pre != a:
        pre += 1
    post = 0
    while post < min(len(src), len(dst)) - pre and src[-1 - post] == dst[-1 - post] and len(src) - 1 - post != a:
        post += 1
    mid_src, mid_dst = src[pre : len(src) - post], dst[pre : len(dst) - post]
    if not pre <= a < len(src) - post:
        raise Unprovable("a reshape moves the head axis")
    if not all(isinstance(d, int) for d in mid_src + mid_dst):
        raise Unprovable("a reshape merges the heads with a dynamic axis")
    i = a - pre
    before, after = [int(d) for d in mid_src[:i]], [int(d) for d in mid_src[i + 1 :]]
    if math.prod(before) != 1:
        raise Unprovable("a reshape merges the heads with an outer axis")
    block = layout.per * math.prod(after)  # entries of one unit, flattened
    out = [int(d) for d in mid_dst]
    for j in range(len(out)):
        if math.prod(out[:j]) != 1:
            break
        inner = math.prod(out[j + 1 :])
        if block % inner == 0 and out[j] == units * (block // inner):
            return Layout(j + pre - len(dst), block // inner)
        if inner % block == 0 and block < inner:
            raise Coarser(inner // block)
    raise Unprovable("a reshape splits a head across axes")


def target_entry(node: ir.Node, position: int) -> int | None:
    """The constant value of entry ``position`` of a Reshape/Expand target shape (None: dynamic)."""
    shape = node.inputs[1]
    if shape is None:
        return None
    if shape.const_value is not None:
        return int(shape.const_value.numpy().reshape(-1)[position])
    concat = shape.producer()
    if concat is None or concat.op_type != "Concat":
        return None
    offset = 0
    for piece in concat.inputs:
        piece_dims = dims(piece) if piece is not None else None
        if piece is None or piece_dims is None or len(piece_dims) != 1 or not isinstance(piece_dims[0], int):
            return None
        if offset <= position < offset + piece_dims[0]:
            if piece.const_value is None:
                return None
            return int(piece.const_value.numpy().reshape(-1)[position - offset])
        offset += piece_dims[0]
    return None
