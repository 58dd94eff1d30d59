"""Attention heads as structured units: Q/K/V output columns by head, O's K rows, and the shapes that count heads.

The coupling walker (:mod:`graphprune.graph.coupling`) starts at each projection whose input is a Reshape that
merges ``[.., heads, head_dim]`` and grows a region of tensors that carry the heads, each with its head axis and
how many entries of that axis one unit spans. Under the :data:`HEADS` policy it follows the ops a head passes
through unchanged: Reshape/Unsqueeze/Squeeze/Expand (their recorded input and output shapes must show where the
head axis goes, and a constant entry of their target shape that counts heads is rewritten), Transpose, elementwise
ops whose other inputs broadcast over heads, MatMul batched over heads (Q·Kᵀ, P·V), Softmax and Slice/Concat along
other axes. Under grouped-query attention a key/value head is expanded to several query heads; the unit then
becomes the KV group (its key/value head and all its query heads), which keeps the query-to-KV grouping valid;
with a single key/value head (multi-query attention, Gemma 3 270M's) that group is the whole attention, so none is
offered.
Anything else (a Shape read of a head tensor, a Reshape that merges heads with a dynamic axis, a missing recorded
shape) ends the candidate with its reason.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphprune.graph.coupling import (
    Coarser,
    Layout,
    Policy,
    ShapeEntry,
    Unprovable,
    Walk,
    consumer_slot,
    dims,
    required,
)
from graphprune.graph.groups import Group, GroupScan, GroupSkip
from graphprune.graph.op_rules import Flow

# Heads move between axes (reshapes, transposes, batched products): every shape on the way must be recorded.
HEADS = Policy(
    "heads",
    frozenset(
        {
            Flow.UNARY,
            Flow.ELEMENTWISE,
            Flow.RESHAPE,
            Flow.EXPAND,
            Flow.TRANSPOSE,
            Flow.MATMUL,
            Flow.ALONG_AXIS,
            Flow.SHAPE,
        }
    ),
    exact_shapes=True,
)


ONE_KV_GROUP = "one key/value head serves every query head: the only unit would be the whole attention"


def _grow(seed: ir.Node, units: int, per: int) -> Walk:
    walk = Walk(HEADS, units).grow([(required(seed.inputs[0]), Layout(-1, per))])
    if not walk.producers:
        raise Unprovable("no projection writes the heads")
    return walk


def _seed_heads(seed: ir.Node) -> tuple[int, int] | None:
    """(heads, head_dim) when ``seed`` is a MatMul whose input merges ``[.., heads, head_dim]`` by a Reshape."""
    if seed.op_type != "MatMul" or consumer_slot(seed, 0) is None:
        return None
    merge = required(seed.inputs[0]).producer()
    if merge is None or merge.op_type != "Reshape":
        return None
    shape = dims(required(merge.inputs[0]))
    if shape is None or len(shape) < 2 or not isinstance(shape[-1], int) or not isinstance(shape[-2], int):
        return None
    return shape[-2], shape[-1]


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
            except Coarser as coarser:
                if units % coarser.factor:
                    skips.append(GroupSkip(node.name or "?", "heads do not split into equal KV groups"))
                    region = None
                    break
                units, per = units // coarser.factor, per * coarser.factor
                if units == 1:  # multi-query attention: no unit is smaller than the whole attention
                    skips.append(GroupSkip(f"attention read by {node.name}", ONE_KV_GROUP))
                    region = None
                    break
            except Unprovable as why:
                skips.append(GroupSkip(f"attention read by {node.name}", str(why)))
                region = None
                break
        if region is None:
            continue
        unit_sizes = dict(enumerate(region.slot_per))
        groups.append(
            Group(
                name=f"heads into {node.name}",
                kind="heads",
                width=units,
                unit_size=per,
                slots=region.slots,
                consumer_inputs=region.consumer_inputs,
                region=list(region.layout),
                slot_unit_size=unit_sizes,
                shape_edits=region.shape_edits,
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
        piece_dims = dims(piece)
        length = piece_dims[0] if piece_dims is not None and isinstance(piece_dims[0], int) else 1
        if offset <= entry.position < offset + length:
            assert piece.const_value is not None  # the entry was found constant (target_entry)
            array = piece.const_value.numpy().copy()
            array.reshape(-1)[entry.position - offset] = value
            concat.replace_input_with(index, _constant(graph, array, f"{piece.name}_heads"))
            _drop_if_unused(graph, piece)
            return
        offset += length


def _drop_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    if not value.uses() and value.is_initializer() and not value.is_graph_input() and not value.is_graph_output():
        del graph.initializers[str(value.name)]


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
