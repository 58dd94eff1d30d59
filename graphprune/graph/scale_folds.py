"""Where a per-channel scale folds exactly: SmoothQuant's ``X' = X / s``, ``W' = diag(s)·W`` without a new op.

For each activation ``X`` that weights read along their K axis (Q/K/V, gate/up, down), the fold point is what
writes ``X``'s channels, found by walking back through the ops a positive per-channel scale passes through
unchanged (the ``scale`` entries of :data:`~graphprune.graph.op_rules.RULES`): a norm's weight and bias
(``LayerNormalization``, or the ``Mul`` by a stored weight that ends an exported RMSNorm, with the ``Add`` of its
bias), or the output columns (and biases) of the weights that write ``X`` (up's columns under SwiGLU's
``silu(gate) ⊙ up``, since the product is linear in up). Multiplying every *scaled* slot by ``s`` along its
channel axis and dividing every *consumer*'s K rows by ``s`` leaves the model's outputs unchanged, so long as every
tensor on the way is read only on the way (a norm output that also feeds the residual stream is no fold) and every
reader of ``X`` is a consumer.

Between the head reshapes of an attention the channel index is spread over two axes (heads, head channels); the
walk follows it through reshapes, transposes and ``P·V`` by the recorded shapes, so V's columns (and bias) fold
into O's rows where the model records its shapes (run ONNX shape inference first where it does not). Under
grouped-query attention O's rows count query heads and V's columns key/value heads: no fold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphprune.graph.coupling import (
    STANDARD,
    Layout,
    Slot,
    const_shape,
    consumer_slot,
    dims,
    producer_slots,
    required,
    stored,
)
from graphprune.graph.coupling import uniform as _uniform
from graphprune.graph.op_rules import Flow, Scale, data_inputs, rule_of
from graphprune.graph.stored import read_array, replace_tensor


@dataclass(frozen=True)
class ScaleFold:
    """A per-channel scale of ``activation`` (channels on its last axis) folded into stored tensors.

    Multiplying each of ``scaled`` by ``s`` along its axis, and each of ``consumers`` (their K axis) by ``1/s``
    leaves the model's outputs unchanged. ``scaled`` holds a norm's weight and bias (``kind`` "norm") or the
    producing weights' output axes and their biases (``kind`` "weight").
    """

    activation: ir.Value
    channels: int
    scaled: tuple[Slot, ...]
    consumers: tuple[Slot, ...]

    @property
    def kind(self) -> str:
        return "weight" if any(s.role == "producer" for s in self.scaled) else "norm"


def find_scale_folds(model: ir.Model) -> list[ScaleFold]:
    """Every activation of the main graph read by weights along K whose channels a scale folds into exactly."""
    folds = []
    seen: set[ir.Value] = set()
    for node in model.graph:
        x = node.inputs[0] if node.inputs else None
        if x is None or x in seen or consumer_slot(node, 0) is None:
            continue
        seen.add(x)
        fold = scale_fold(x)
        if fold is not None:
            folds.append(fold)
    return folds


def fold_for(model: ir.Model, weight: str) -> ScaleFold | None:
    """The fold of the activation that stored ``weight`` reads along its K axis (None: no exact fold point)."""
    value = model.graph.initializers.get(weight)
    for use in value.uses() if value is not None else ():
        read = consumer_slot(use.node, 0)
        if read is not None and read[1] is value:
            return scale_fold(required(use.node.inputs[0]))
    return None


def scale_fold(x: ir.Value) -> ScaleFold | None:
    """The fold of ``x``'s channels: every reader a weight along K on the last axis, a fold point behind it."""
    if x.is_graph_output() or x.const_value is not None:
        return None
    consumers = []
    for use in x.uses():
        if use.node.op_type == "Shape":  # a shape does not change with a scale
            continue
        read = consumer_slot(use.node, use.idx)
        if read is None or read[0] != -1 or not _alone(read[1], use.node):
            return None
        consumers.append(Slot(read[1], read[2], "consumer", use.node))
    widths = {const_shape(s.value)[s.axis] for s in consumers}
    if len(widths) != 1:
        return None
    channels = widths.pop()
    scaled = _fold_point(x, channels)
    return None if scaled is None else ScaleFold(x, channels, tuple(scaled), tuple(consumers))


def _alone(value: ir.Value, node: ir.Node) -> bool:
    """A stored tensor that only ``node`` reads (a shared one would be scaled for its other readers too)."""
    return stored(value) and {u.node for u in value.uses()} == {node}


def _per_channel(value: ir.Value, channels: int) -> int | None:
    """The axis of a stored per-channel tensor (``[C]``, ``[1, 1, C]``) broadcast along the last axis, or None."""
    if not stored(value):
        return None
    shape = const_shape(value)
    if not shape or shape[-1] != channels or any(d != 1 for d in shape[:-1]):
        return None
    return len(shape) - 1


LAST = (-1,)  # the channels on the last axis (as every fold starts and every fold point writes them)
MOVING = (Flow.RESHAPE, Flow.EXPAND, Flow.TRANSPOSE, Flow.MATMUL)


def _fold_point(value: ir.Value, channels: int, axes: tuple[int, ...] = LAST) -> list[Slot] | None:
    """What to multiply by s so that ``value`` comes out multiplied by s (None where nothing is); ``axes`` are
    the axes that hold the channel index, most significant first (heads and head channels, between the reshapes
    of an attention)."""
    node = value.producer()
    if node is None or node.domain not in STANDARD or value is not node.outputs[0]:
        return None
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return None
    made = producer_slots(node)
    if made is not None:  # every slot must hold the channels (a [K, 1] weight broadcast over them does not)
        if axes != LAST or made[0] != -1:
            return None
        if any(not _alone(w, node) or const_shape(w)[a] != channels for w, a in made[1]):
            return None
        return [Slot(w, axis, "channelwise" if j else "producer", node) for j, (w, axis) in enumerate(made[1])]
    rule = rule_of(node)
    if rule is None or rule.scale is None or (axes != LAST and rule.flow not in (Flow.UNARY, *MOVING)):
        return None
    if rule.flow in MOVING:
        moved = _moved(node, value, axes)
        return None if moved is None else _through(node, moved[0], channels, moved[1])
    if rule.scale is Scale.PARAMETERS:
        return _norm_parameters(node, rule.per_channel, channels)
    inputs = [required(node.inputs[i]) for i in data_inputs(node, rule)]
    if rule.scale is Scale.FIRST:
        return _through(node, inputs[0], channels, axes)
    if rule.scale is Scale.EVERY:
        slots: list[Slot] = []
        for x in inputs:
            found = _through(node, x, channels, axes)
            if found is None:
                return None
            slots += found
        return slots
    for x in inputs:  # Scale.ONE: a stored per-channel factor first (a norm's weight), then the others in order
        axis = _per_channel(x, channels)
        if axis is not None and _alone(x, node):
            return [Slot(x, axis, "channelwise", node)]
    for x in inputs:
        found = _through(node, x, channels, axes)
        if found is not None:
            return found
    return None


def _through(node: ir.Node, x: ir.Value, channels: int, axes: tuple[int, ...]) -> list[Slot] | None:
    """Carry the scale back into input ``x`` of ``node``: a per-channel constant takes it, an activation read
    only by ``node`` passes it on; anything uniform over the channels (a scalar added) cannot take it."""
    if x.const_value is not None:
        axis = _per_channel(x, channels) if axes == LAST else None
        return [Slot(x, axis, "channelwise", node)] if axis is not None and _alone(x, node) else None
    readers = [u.node for u in x.uses() if u.node.op_type != "Shape"]  # a shape does not change with a scale
    if any(_uniform(x, Layout(a)) for a in axes) or x.is_graph_output() or len(readers) != 1:  # x·x: s twice
        return None
    return _fold_point(x, channels, axes)


def _moved(node: ir.Node, value: ir.Value, axes: tuple[int, ...]) -> tuple[ir.Value, tuple[int, ...]] | None:
    """The input of a reshape, transpose or product of activations that carries output ``value``'s channels,
    and the axes they sit on there (None where the scale would not pass exactly)."""
    if node.op_type == "Transpose":
        perm = node.attributes.get_ints("perm", None)
        if perm is None:
            return None
        return required(node.inputs[0]), tuple(perm[len(perm) + a] - len(perm) for a in axes)
    if node.op_type == "MatMul":  # Y = A·B: B's columns (and batch axes) or A's rows (and batch axes)
        a, b = required(node.inputs[0]), required(node.inputs[1])
        for x, own in ((b, -1), (a, -2)):
            shape, out = dims(x), dims(value)
            if shape is None or out is None or not all(i == own or i <= -3 for i in axes):
                continue
            if all(len(shape) >= -i and shape[i] == out[i] for i in axes):  # not broadcast along the channels
                return x, axes
        return None
    source = required(node.inputs[0])
    before, after = dims(source), dims(value)
    k = len(axes)
    if before is None or after is None or axes != tuple(range(-k, 0)):
        return None
    block = after[-k:]
    if node.op_type == "Expand":  # copies along other axes: the channel axes must be there unchanged
        return (source, axes) if before[-k:] == block else None
    if not all(isinstance(d, int) for d in block):  # a reshape keeps a trailing block of the same size:
        return None  # the flat index modulo that size is the channel on both sides
    size = math.prod(int(d) for d in block)
    for j in range(1, len(before) + 1):
        tail = before[-j:]
        if all(isinstance(d, int) for d in tail) and math.prod(int(d) for d in tail) == size:
            return source, tuple(range(-j, 0))
    return None


def _norm_parameters(node: ir.Node, params: tuple[int, ...], channels: int) -> list[Slot] | None:
    """A norm over the last axis: its per-channel weight (and bias) take the scale."""
    axis = node.attributes.get("axis")
    x = node.inputs[0]
    rank = len(x.shape) if x is not None and x.shape is not None else None
    if axis is not None and axis.value != -1 and (rank is None or axis.value != rank - 1):
        return None
    slots = []
    for i in params:
        p = node.inputs[i] if i < len(node.inputs) else None
        if p is None:
            continue
        found = _per_channel(p, channels)
        if found is None or not _alone(p, node):
            return None
        slots.append(Slot(p, found, "channelwise", node))
    return slots


def fold_scale(fold: ScaleFold, scale: np.ndarray) -> None:
    """Multiply the fold's scaled tensors by ``scale`` (one positive value per channel) and divide its consumers'
    K rows by it, in place: the model computes what it did, with ``fold.activation`` multiplied by ``scale``."""
    for slot, factor in [(s, scale) for s in fold.scaled] + [(s, 1.0 / scale) for s in fold.consumers]:
        old = slot.value.const_value
        assert old is not None
        values = read_array(old)
        shape = [1] * values.ndim
        shape[slot.axis] = len(factor)
        scaled = (values * factor.reshape(shape)).astype(values.dtype)
        replace_tensor(slot.value, ir.Tensor(scaled, name=old.name))
