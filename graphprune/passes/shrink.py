"""Remove whole units from a model: slice every coupled weight, bias, norm parameter and shape constant.

:class:`ShrinkPass` is an ``onnx_ir`` in-place pass (``ShrinkPass(removals)(model)``, composable with
``ir.passes.Sequential``). For each group it is given the units to remove and, for FLAP or the refit, the bias to
add to each consumer (the removed channels' mean contribution, or the refit's change) and, for the refit, new
values of consumer weights (full width: the rows of removed channels are sliced off afterwards); a consumer
without a bias gets one (a bias input of Gemm/Conv, or an ``Add`` after a MatMul). Tensors between producers
and consumers lose their stored shapes (ONNX Runtime infers them again). Pre-condition: each group's tensors
are in the model and its units exist, are distinct and leave at least one; post-condition: every tensor of a
group has exactly the channels left.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphprune.algorithms.structured import channels_of_units
from graphprune.graph.groups import Group, Slot, stored
from graphprune.graph.heads import set_shape_entry
from graphprune.passes.base import PassPostconditionError, PassPreconditionError


@dataclass
class Removal:
    """What to remove from one group: unit indices, a bias change per consumer node (output-sized), and refitted
    consumer weights (same shape as stored, set before the removed channels are sliced off)."""

    group: Group
    units: np.ndarray
    bias: Mapping[ir.Node, np.ndarray] = field(default_factory=dict)
    weights: Mapping[ir.Value, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class GroupReport:
    name: str
    kind: str
    units_before: int
    units_after: int
    removed: tuple[int, ...]
    parameters_before: int
    parameters_after: int
    compensated: bool
    refitted: int  # consumer weights refitted


@dataclass
class ShrinkResult(ir.passes.PassResult):
    """What the pass did (``model``, ``modified``, as every onnx-ir pass) and one report per group."""

    groups: list[GroupReport] = field(default_factory=list)


def parameter_count(model: ir.Model) -> int:
    """Elements of every stored tensor of the main graph."""
    return sum(int(np.prod(v.shape.numpy())) for v in model.graph.initializers.values() if v.shape is not None)


def _set_tensor(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.Tensor(np.ascontiguousarray(array), name=value.name)
    value.shape = ir.Shape(array.shape)


class ShrinkPass(ir.passes.InPlacePass):
    """Slice the removed units out of every tensor of their groups (in place)."""

    def __init__(self, removals: Sequence[Removal]) -> None:
        super().__init__()
        self.removals = removals

    def requires(self, model: ir.Model) -> None:
        initializers = model.graph.initializers
        for r in self.removals:
            units = np.asarray(r.units)
            name = r.group.name
            if units.size and (units.min() < 0 or units.max() >= r.group.width):
                raise PassPreconditionError(f"group {name}: units {units.tolist()} outside 0..{r.group.width - 1}")
            if len(np.unique(units)) != units.size:
                raise PassPreconditionError(f"group {name}: a unit is listed twice")
            if units.size >= r.group.width:
                raise PassPreconditionError(f"group {name} has {r.group.width} units: cannot remove all of them")
            for slot in r.group.slots:
                if initializers.get(slot.value.name) is not slot.value:  # type: ignore[arg-type]  # an initializer is named
                    raise PassPreconditionError(f"group {name}: tensor {slot.value.name} is not in this model")
            consumers = {id(s.value) for s in r.group.consumers}
            for value, array in r.weights.items():
                if id(value) not in consumers:
                    raise PassPreconditionError(f"group {name}: {value.name} is not one of its consumer weights")
                if tuple(array.shape) != tuple(value.const_value.shape):  # type: ignore[union-attr]  # a stored weight
                    raise PassPreconditionError(
                        f"group {name}: new values of {value.name} have shape {list(array.shape)}, "
                        f"the tensor {list(value.const_value.shape)}"  # type: ignore[union-attr]  # a stored weight
                    )

    def call(self, model: ir.Model) -> ShrinkResult:
        before = {id(r): r.group.parameters() for r in self.removals}
        for r in self.removals:  # refitted weights, at the width they were computed for
            for value, array in r.weights.items():
                _set_tensor(value, array.astype(value.const_value.dtype.numpy(), copy=False))  # type: ignore[union-attr]  # stored (requires)
        # Biases first, on the full-width weights: a new bias of a node that also writes another group's
        # channels (Conv → Conv → Conv) joins that group, so its own slicing below shrinks it too.
        for r in self.removals:
            for node, delta in r.bias.items():
                created = add_bias(model.graph, node, delta)
                if created is not None:
                    _join_groups(self.removals, node, *created)
        for r in self.removals:
            if len(r.units):
                _remove_units(model.graph, r.group, np.asarray(r.units))
        reports = [
            GroupReport(
                r.group.name,
                r.group.kind,
                r.group.width + len(r.units),
                r.group.width,
                tuple(int(u) for u in r.units),
                before[id(r)],
                r.group.parameters(),
                bool(r.bias),
                len(r.weights),
            )
            for r in self.removals
        ]
        return ShrinkResult(model, any(len(r.units) for r in self.removals), reports)

    def ensures(self, model: ir.Model) -> None:
        for r in self.removals:
            group = r.group
            for i, slot in enumerate(group.slots):
                have = slot.value.const_value.shape[slot.axis]  # type: ignore[union-attr]  # slots hold stored constants (checked above)
                if have != group.width * group.unit_size_of(i):
                    raise PassPostconditionError(
                        f"group {group.name}: {slot.value.name} has {have} channels on axis {slot.axis}, "
                        f"expected {group.width * group.unit_size_of(i)}"
                    )
            for conv in group.depthwise:
                if conv.attributes["group"].value != group.width:
                    raise PassPostconditionError(f"group {group.name}: depthwise {conv.name} has the wrong group")


def _join_groups(removals: Sequence[Removal], node: ir.Node, reader: ir.Node, bias: ir.Value) -> None:
    """A bias added to ``node``'s output carries the channels of every group ``node`` produces for."""
    for r in removals:
        if any(s.role == "producer" and s.node is node for s in r.group.slots):
            r.group.slots.append(Slot(bias, len(bias.const_value.shape) - 1, "channelwise", reader))  # type: ignore[union-attr]  # a bias: a stored constant
            if reader is not node:
                r.group.region.append(reader.outputs[0])


def _remove_units(graph: ir.Graph, group: Group, units: np.ndarray) -> None:
    for i, slot in enumerate(group.slots):
        assert slot.value.const_value is not None
        array = slot.value.const_value.numpy()
        drop = channels_of_units(units, group.unit_size_of(i))
        keep = np.setdiff1d(np.arange(array.shape[slot.axis]), drop)
        _set_tensor(slot.value, np.take(array, keep, axis=slot.axis))
    left = group.width - len(units)
    for entry in group.shape_edits:
        set_shape_entry(graph, entry, left * entry.per)
    for conv in group.depthwise:  # one filter per channel: as many groups as channels left
        conv.attributes["group"] = ir.AttrInt64("group", left)
    for value in group.region:
        value.shape = None
    group.width = left


def add_bias(graph: ir.Graph, node: ir.Node, delta: np.ndarray) -> tuple[ir.Node, ir.Value] | None:
    """Add ``delta`` (one value per output channel) to ``node``'s output: its bias, or a new one.

    Returns the node that reads a newly created bias tensor, and that tensor (None when an existing one changed).
    """
    op = node.op_type
    if op in ("Conv", "Gemm") and len(node.inputs) > 2 and stored(node.inputs[2]):
        bias = node.inputs[2]
        assert bias is not None and bias.const_value is not None
        stored_bias = bias.const_value.numpy()
        scale = 1.0
        if op == "Gemm" and "beta" in node.attributes:
            scale = float(node.attributes["beta"].value)
        new = stored_bias.astype(np.float64) + delta / scale  # broadcasts along the last (channel) axis
        _set_tensor(bias, np.asarray(new, dtype=stored_bias.dtype))
        return None
    out = node.outputs[0]
    dtype = node.inputs[1].const_value.numpy().dtype  # type: ignore[union-attr]  # a stored weight (checked by the caller)
    if op == "MatMul":
        follower = _bias_add(out)
        if follower is not None:
            _set_tensor(follower, np.asarray(follower.const_value.numpy() + delta, dtype=dtype))  # type: ignore[union-attr]  # _bias_add() returns a stored constant
            return None
    value = ir.Value(
        name=f"{out.name}_graphprune_bias", const_value=ir.tensor(np.asarray(delta, dtype).reshape(-1))
    )
    value.const_value.name = value.name  # type: ignore[union-attr]  # const_value given above
    value.shape, value.dtype = ir.Shape([delta.size]), value.const_value.dtype  # type: ignore[union-attr]  # const_value given above
    graph.register_initializer(value)
    if op in ("Conv", "Gemm"):
        node.resize_inputs(3)
        node.replace_input_with(2, value)
        return node, value
    uses = list(out.uses())
    added = ir.node("Add", [out, value], name=f"{out.name}_graphprune_bias_add")  # node names may be empty
    graph.insert_after(node, added)
    new_out = added.outputs[0]
    new_out.name = f"{out.name}_biased"
    if out.dtype is not None:
        new_out.dtype = out.dtype
    for use in uses:
        use.node.replace_input_with(use.idx, new_out)
    if out.is_graph_output():
        index = list(graph.outputs).index(out)
        graph.outputs[index] = new_out
        out.name, new_out.name = new_out.name, out.name
    return added, value


def stored_bias(node: ir.Node) -> ir.Value | None:
    """The stored bias :func:`add_bias` would change: Gemm's or Conv's bias input, or a MatMul's bias ``Add``."""
    if node.op_type in ("Conv", "Gemm"):
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        return bias if bias is not None and stored(bias) else None
    return _bias_add(node.outputs[0]) if node.op_type == "MatMul" else None


def _bias_add(out: ir.Value) -> ir.Value | None:
    """The stored bias of an ``Add`` that is the only reader of a MatMul's output, when it is per channel."""
    uses = list(out.uses())
    if len(uses) != 1 or uses[0].node.op_type != "Add" or out.is_graph_output():
        return None
    add = uses[0].node
    other = add.inputs[1 - uses[0].idx]
    if not stored(other) or len(other.uses()) != 1:
        return None
    shape = other.const_value.shape.numpy()  # type: ignore[union-attr]  # stored(): a constant
    if len(shape) >= 1 and all(d == 1 for d in list(shape)[:-1]) and shape[-1] > 1:
        return other
    return None
