"""Attention heads as structured units: Q/K/V output columns by head, O's K rows, and the shapes that count heads.

The walk starts at each projection whose input is a Reshape that merges ``[.., heads, head_dim]`` and grows
a region of tensors that carry the heads, each with its head axis and how many entries of that axis one unit spans.
Ops a head passes through unchanged are followed: Reshape/Unsqueeze/Squeeze/Expand (their recorded input and output
shapes must show where the head axis goes, and a constant entry of their target shape that counts heads is
rewritten), Transpose, elementwise ops whose other inputs broadcast over heads, MatMul batched over heads (Q·Kᵀ,
P·V), Softmax and Slice/Concat along other axes. Under grouped-query attention a key/value head is expanded to
several query heads; the unit then becomes the KV group (its key/value head and all its query heads), which keeps
the query-to-KV grouping valid. Anything else (a Shape read of a head tensor, a Reshape that merges heads with a
dynamic axis, a missing recorded shape) ends the candidate with its reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphprune.graph.groups import (
    CHANNELWISE_UNARY,
    Group,
    GroupScan,
    GroupSkip,
    ShapeEntry,
    Slot,
    Unprovable,
    consumer_slot,
    producer_slots,
    stored,
)

_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Where", "And", "Or", "Equal", "Max", "Min"})
_UNARY = CHANNELWISE_UNARY | {"IsNaN", "Not", "Sqrt", "Reciprocal"}
_RESHAPES = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Expand"})


@dataclass(frozen=True)
class State:
    axis: int  # negative head axis
    per: int  # entries of that axis one unit spans


class _Coarser(Exception):
    """The unit must be ``factor`` times larger (a KV group rather than a head)."""

    def __init__(self, factor: int) -> None:
        self.factor = factor


def _dims(value: ir.Value) -> list[int | str] | None:
    """Recorded dimensions: ints, or names of symbolic dims (None when any is unnamed or the shape unknown)."""
    if value.shape is None:
        return None
    out: list[int | str] = []
    for d in value.shape.dims:
        if isinstance(d, int):
            out.append(d)
        elif getattr(d, "value", None):
            out.append(str(d.value))
        else:
            out.append(f"?{id(value)}:{len(out)}")  # unnamed: equal to nothing else
    return out


def _map_reshape(src: list[int | str], dst: list[int | str], state: State, units: int) -> State:
    """Where a head axis of ``src`` lands in ``dst`` when a Reshape turns one into the other."""
    a = len(src) + state.axis
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
    if math.prod(mid_src[:i]) != 1:  # type: ignore[arg-type]
        raise Unprovable("a reshape merges the heads with an outer axis")
    block = state.per * math.prod(mid_src[i + 1 :])  # type: ignore[arg-type]  # entries of one unit, flattened
    for j in range(len(mid_dst)):
        if math.prod(mid_dst[:j]) != 1:  # type: ignore[arg-type]
            break
        inner = math.prod(mid_dst[j + 1 :])  # type: ignore[arg-type]
        if block % inner == 0 and mid_dst[j] == units * (block // inner):
            return State(j + pre - len(dst), block // inner)
        if inner % block == 0 and block < inner:
            raise _Coarser(inner // block)
    raise Unprovable("a reshape splits a head across axes")


class _HeadRegion:
    def __init__(self, units: int) -> None:
        self.units = units
        self.state: dict[ir.Value, State] = {}
        self.nodes: set[ir.Node] = set()
        self.slots: list[tuple[Slot, int]] = []
        self.entries: list[ShapeEntry] = []
        self.consumers: list[tuple[ir.Node, ir.Value, int]] = []
        self.producers: set[ir.Node] = set()
        self.queue: list[ir.Value] = []

    def add(self, value: ir.Value, state: State) -> None:
        if value in self.state:
            if self.state[value] != state:
                raise Unprovable(f"tensor {value.name} carries heads in two ways")
            return
        if value.const_value is not None:
            raise Unprovable(f"constant {value.name} would need head slicing")
        dims = _dims(value)
        if dims is None:
            raise Unprovable(f"tensor {value.name} has no recorded shape")
        if len(dims) < -state.axis or dims[state.axis] != self.units * state.per:
            raise Unprovable(
                f"tensor {value.name} does not have {self.units * state.per} entries on its head axis"
            )
        self.state[value] = state
        self.queue.append(value)

    def slot(self, value: ir.Value, axis: int, role: str, node: ir.Node, per: int) -> None:
        if {u.node for u in value.uses()} - {node}:
            raise Unprovable(f"{role} tensor {value.name} is shared")
        if any(s.value is value for s, _ in self.slots):
            return
        shape = value.const_value.shape  # type: ignore[union-attr]
        if shape[axis] != self.units * per:
            raise Unprovable(f"{role} tensor {value.name} does not split into {self.units} units")
        self.slots.append((Slot(value, axis, role, node), per))


def _target_entry(node: ir.Node, position: int) -> int | None:
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
        dims = _dims(piece) if piece is not None else None
        if piece is None or dims is None or len(dims) != 1 or not isinstance(dims[0], int):
            if piece is not None and piece.const_value is not None:
                dims = [int(piece.const_value.shape[0])]
            else:
                return None
        if offset <= position < offset + dims[0]:
            if piece.const_value is None:
                return None
            return int(piece.const_value.numpy().reshape(-1)[position - offset])
        offset += dims[0]  # type: ignore[operator]
    return None


def _reshape_like(region: _HeadRegion, node: ir.Node, forward: bool) -> None:
    src, dst = node.inputs[0], node.outputs[0]
    assert src is not None
    known, other = (src, dst) if forward else (dst, src)
    dims_known, dims_other = _dims(known), _dims(other)
    if dims_known is None or dims_other is None:
        raise Unprovable(f"{node.op_type} {node.name} has no recorded shapes")
    state = region.state[known]
    if node.op_type == "Expand":
        if len(dims_known) != len(dims_other) or dims_known[state.axis] != dims_other[state.axis]:
            raise Unprovable(f"Expand {node.name} broadcasts the head axis")
        mapped = state
    else:
        mapped = _map_reshape(dims_known, dims_other, state, region.units)
    region.add(other, mapped)
    if node.op_type in ("Reshape", "Expand"):
        out_state = region.state[dst]
        position = len(_dims(dst)) + out_state.axis  # type: ignore[arg-type]
        entry = _target_entry(node, position)
        if entry == region.units * out_state.per:
            region.entries.append(ShapeEntry(node, position, out_state.per))
        elif not (entry == -1 and node.op_type == "Reshape") and not (entry == 1 and node.op_type == "Expand"):
            raise Unprovable(f"{node.op_type} {node.name} has a target shape it cannot rewrite")


def _norm_axis(axis: int, value: ir.Value) -> int:
    rank = len(_dims(value) or [])
    return axis - rank if axis >= 0 else axis


def _visit(region: _HeadRegion, node: ir.Node, via: ir.Value) -> None:
    """Follow ``node``, reached through region tensor ``via`` (one of its inputs or outputs)."""
    if node in region.nodes:
        return
    op = node.op_type
    state = region.state[via]
    forward = via in node.inputs
    if not forward and (made := producer_slots(node)) is not None and op == "MatMul" and state.axis == -1:
        region.nodes.add(node)
        region.producers.add(node)
        region.slot(made[1][0][0], 1, "producer", node, state.per)
        return
    if forward and op == "MatMul" and (read := consumer_slot(node, 0)) is not None and node.inputs[0] is via:
        if state.axis != -1:
            raise Unprovable(f"MatMul {node.name} reads the heads on another axis")
        region.nodes.add(node)
        region.slot(read[1], 0, "consumer", node, state.per)
        region.consumers.append((node, via, -1))
        return
    region.nodes.add(node)
    if op in _UNARY:
        region.add(node.inputs[0], state)  # type: ignore[arg-type]
        region.add(node.outputs[0], state)
    elif op in _ELEMENTWISE:
        for inp in node.inputs:
            assert inp is not None
            if inp in region.state:
                continue
            dims = _dims(inp) if inp.const_value is None else list(inp.const_value.shape)
            if dims is not None and (len(dims) < -state.axis or dims[state.axis] == 1):
                continue  # broadcasts over heads
            if inp.const_value is not None and stored(inp) and len(dims) == -state.axis:  # type: ignore[arg-type]
                region.slot(inp, len(dims) + state.axis, "channelwise", node, state.per)  # type: ignore[arg-type]
                continue
            region.add(inp, state)
        region.add(node.outputs[0], state)
    elif op in _RESHAPES:
        _reshape_like(region, node, forward)
    elif op == "Transpose":
        perm = list(node.attributes["perm"].value)
        rank = len(perm)
        if forward:
            region.add(node.outputs[0], State(perm.index(rank + state.axis) - rank, state.per))
        else:
            region.add(node.inputs[0], State(perm[rank + state.axis] - rank, state.per))  # type: ignore[arg-type]
    elif op == "MatMul":
        if state.axis > -3:
            raise Unprovable(f"MatMul {node.name} multiplies along the head axis")
        for v in [*node.inputs, node.outputs[0]]:
            region.add(v, state)  # type: ignore[arg-type]
    elif op in ("Softmax", "LogSoftmax"):
        axis = node.attributes["axis"].value if "axis" in node.attributes else -1
        if _norm_axis(axis, via) == state.axis:
            raise Unprovable(f"{op} {node.name} normalises across heads")
        region.add(node.inputs[0], state)  # type: ignore[arg-type]
        region.add(node.outputs[0], state)
    elif op == "Slice":
        axes = node.inputs[3] if len(node.inputs) > 3 else None
        if axes is None or axes.const_value is None:
            raise Unprovable(f"Slice {node.name} may cut the head axis")
        if any(_norm_axis(int(a), via) == state.axis for a in axes.const_value.numpy().reshape(-1)):
            raise Unprovable(f"Slice {node.name} cuts the head axis")
        region.add(node.inputs[0], state)  # type: ignore[arg-type]
        region.add(node.outputs[0], state)
    elif op == "Concat":
        if _norm_axis(node.attributes["axis"].value, via) == state.axis:
            raise Unprovable(f"Concat {node.name} joins along the head axis")
        for v in [*node.inputs, node.outputs[0]]:
            region.add(v, state)  # type: ignore[arg-type]
    elif op == "Shape" and forward:
        _shape_read(node, via, state)
    else:
        raise Unprovable(f"heads are read by {op} {node.name}")


def _shape_read(node: ir.Node, via: ir.Value, state: State) -> None:
    """A Shape of a head tensor is harmless when only entries other than the head count are picked from it."""
    rank = len(_dims(via) or [])
    head = rank + state.axis
    if "start" in node.attributes or "end" in node.attributes:
        raise Unprovable(f"Shape {node.name} takes a range of a head tensor's shape")
    for use in node.outputs[0].uses():
        user = use.node
        consts = [
            v.const_value.numpy().reshape(-1) if v is not None and v.const_value is not None else None
            for v in user.inputs[1:]
        ]
        if user.op_type == "Gather" and use.idx == 0 and consts and consts[0] is not None:
            picked = {int(i) % rank for i in consts[0]}
        elif user.op_type == "Slice" and use.idx == 0 and len(consts) >= 2 and all(c is not None for c in consts):
            start, end = (int(np.clip(c[0] + rank if c[0] < 0 else c[0], 0, rank)) for c in consts[:2])
            step = int(consts[3][0]) if len(consts) > 3 else 1
            picked = set(range(start, end, step))
        else:
            raise Unprovable(f"the shape of a head tensor is read by {user.op_type} {user.name}")
        if head in picked:
            raise Unprovable(f"{user.op_type} {user.name} reads the head count from a shape")


def _grow(seed: ir.Node, units: int, per: int) -> _HeadRegion:
    region = _HeadRegion(units)
    region.add(seed.inputs[0], State(-1, per))  # type: ignore[arg-type]
    while region.queue:
        value = region.queue.pop()
        if value.is_graph_output() or value.is_graph_input():
            raise Unprovable(f"head tensor {value.name} is a model input or output")
        producer = value.producer()
        if producer is None:
            raise Unprovable(f"head tensor {value.name} has no producer")
        _visit(region, producer, value)
        for use in value.uses():
            _visit(region, use.node, value)
    if not region.producers:
        raise Unprovable("no projection writes the heads")
    return region


def _seed_heads(seed: ir.Node) -> tuple[int, int] | None:
    """(heads, head_dim) when ``seed`` is a MatMul whose input merges ``[.., heads, head_dim]`` by a Reshape."""
    if seed.op_type != "MatMul" or consumer_slot(seed, 0) is None:
        return None
    merge = seed.inputs[0].producer()  # type: ignore[union-attr]
    if merge is None or merge.op_type != "Reshape":
        return None
    dims = _dims(merge.inputs[0])  # type: ignore[arg-type]
    if dims is None or len(dims) < 2 or not isinstance(dims[-1], int) or not isinstance(dims[-2], int):
        return None
    return dims[-2], dims[-1]


def find_head_groups(model: ir.Model) -> GroupScan:
    """Attention-head groups (one per attention), and the attentions skipped with their reasons."""
    groups: list[Group] = []
    skips: list[GroupSkip] = []
    for node in model.graph:
        found = _seed_heads(node)
        if found is None:
            continue
        heads, head_dim = found
        units, per = heads, head_dim
        while True:
            try:
                region = _grow(node, units, per)
                break
            except _Coarser as coarser:
                if units % coarser.factor:
                    skips.append(GroupSkip(node.name or "?", "heads do not split into equal KV groups"))
                    region = None
                    break
                units, per = units // coarser.factor, per * coarser.factor
            except Unprovable as why:
                skips.append(GroupSkip(f"attention read by {node.name}", str(why)))
                region = None
                break
        if region is None:
            continue
        slots = [s for s, _ in region.slots]
        unit_sizes = {i: p for i, (_, p) in enumerate(region.slots)}
        groups.append(
            Group(
                name=f"heads into {node.name}",
                kind="heads",
                width=units,
                unit_size=per,
                slots=slots,
                consumer_inputs=region.consumers,
                region=[v for v in region.state],
                slot_unit_size=unit_sizes,
                shape_edits=region.entries,
            )
        )
    return GroupScan(groups, skips)


def set_shape_entry(graph: ir.Graph, entry: ShapeEntry, value: int) -> None:
    """Rewrite one entry of a Reshape/Expand target shape, copying shared constants and Concats first."""
    node = entry.node
    shape = node.inputs[1]
    assert shape is not None
    if shape.const_value is not None:
        array = shape.const_value.numpy().copy()
        array.reshape(-1)[entry.position] = value
        node.replace_input_with(1, _constant(graph, array, f"{shape.name}_heads"))
        _drop_if_unused(graph, shape)
        return
    concat = shape.producer()
    assert concat is not None
    if len(shape.uses()) > 1:  # shared with other Reshapes: give this one its own Concat
        copy = ir.node(
            "Concat", list(concat.inputs), attributes={"axis": 0}, name=f"{concat.name}_heads_{node.name}"
        )
        copy.outputs[0].name = f"{shape.name}_heads_{node.name}"
        copy.outputs[0].dtype = ir.DataType.INT64
        graph.insert_before(node, copy)
        node.replace_input_with(1, copy.outputs[0])
        concat = copy
    offset = 0
    for index, piece in enumerate(concat.inputs):
        assert piece is not None
        length = int(piece.const_value.shape[0]) if piece.const_value is not None else 1
        if piece.const_value is None and (dims := _dims(piece)) is not None and isinstance(dims[0], int):
            length = dims[0]
        if offset <= entry.position < offset + length:
            array = piece.const_value.numpy().copy()  # type: ignore[union-attr]
            array.reshape(-1)[entry.position - offset] = value
            concat.replace_input_with(index, _constant(graph, array, f"{piece.name}_heads"))
            _drop_if_unused(graph, piece)
            return
        offset += length


def _drop_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    if not value.uses() and value.is_initializer() and not value.is_graph_input() and not value.is_graph_output():
        del graph.initializers[value.name]  # type: ignore[arg-type]


def _constant(graph: ir.Graph, array: np.ndarray, hint: str) -> ir.Value:
    name = hint
    count = 0
    while name in graph.initializers:
        count += 1
        name = f"{hint}_{count}"
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape = ir.Shape(array.shape)
    value.dtype = ir.DataType.INT64
    graph.register_initializer(value)
    return value
