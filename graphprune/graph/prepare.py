"""Exact rewrites that make a graph's structured units provable, run before the group finders.

:func:`prepare_graph` lifts Constant nodes to initializers (weights exported as Constant nodes become stored,
slicable tensors), folds Reshapes of constants into constants (a per-channel bias reshaped to ``[1, C, 1, 1]``),
records shapes by inference and, for heads, folds the exporters' key transposes. Each step leaves what the model
computes unchanged.

PyTorch's dynamo exporter (onnxscript's ``aten::matmul``/SDPA lowering) transposes the keys of a 4-D attention
``[batch, heads, seq, head_dim]`` as Reshape to ``[-1, seq, head_dim]`` → Transpose ``(0, 2, 1)`` → Reshape back
to ``[batch, heads, head_dim, seq]``, with every entry of both target shapes read at run time from ``Shape`` of
the keys themselves. The first Reshape merges the heads with the batch, which the head finder cannot follow, and
the second reads the head count from the tensor. The three nodes compute exactly ``Transpose(x, perm=(.., -1,
-2))``: the first Reshape flattens the leading axes in row-major order, the Transpose swaps the last two axes of
every leading index, and the second Reshape restores the leading axes with the sizes just read from ``x``. So
they are replaced by that one Transpose when, and only when, both target shapes are proven to be built that way
(constant ``-1`` and entries of ``Shape(x)`` picked by constant Slice/Gather indices). The result is the same for
every input on which the original runs, whatever the head count, and one node replaces several.
"""

from __future__ import annotations

import contextlib

import onnx_ir as ir

from graphprune.graph.groups import stored

_Entry = int | tuple[str, int]  # a constant entry, or ("dim", i): dimension i of the tensor being reshaped


def _ints(value: ir.Value | None) -> list[int] | None:
    if value is None or value.const_value is None:
        return None
    return [int(v) for v in value.const_value.numpy().reshape(-1)]


def _dims_of(value: ir.Value, source: ir.Value, rank: int) -> list[int] | None:
    """When 1-D ``value`` holds dimensions of ``source`` read by its Shape: their (non-negative) indices."""
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "Shape":
        if node.inputs[0] is not source:
            return None
        start = node.attributes["start"].value if "start" in node.attributes else 0
        end = node.attributes["end"].value if "end" in node.attributes else rank
        return list(range(rank))[start:end]  # ONNX clamps start/end like Python slicing
    if node.op_type not in ("Slice", "Gather") or node.inputs[0] is None:
        return None
    inner = _dims_of(node.inputs[0], source, rank)
    if inner is None:
        return None
    if node.op_type == "Gather":
        picked = _ints(node.inputs[1])
        if picked is None or node.inputs[1].const_value.shape.rank() != 1:  # type: ignore[union-attr]  # _ints() found a constant
            return None
        if any(not -len(inner) <= i < len(inner) for i in picked):
            return None
        return [inner[i] for i in picked]
    starts, ends = _ints(node.inputs[1]), _ints(node.inputs[2])
    axes = _ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else [0]
    steps = _ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else [1]
    if starts is None or ends is None or axes not in ([0], [-1]) or steps != [1] or len(starts) != 1:
        return None
    return inner[starts[0] : ends[0]]  # positive step: ONNX Slice clamps like Python slicing


def _target(shape: ir.Value | None, source: ir.Value, rank: int) -> list[_Entry] | None:
    """The entries of a Reshape target shape, each a constant or a dimension of ``source`` (None: unknown)."""
    if shape is None:
        return None
    if (constant := _ints(shape)) is not None:
        return list(constant)
    node = shape.producer()
    if node is None or node.op_type != "Concat":
        return None
    out: list[_Entry] = []
    for piece in node.inputs:
        if piece is None:
            return None
        if (constant := _ints(piece)) is not None:
            out += constant
        elif (dims := _dims_of(piece, source, rank)) is not None:
            out += [("dim", i) for i in dims]
        else:
            return None
    return out


def _single_user(value: ir.Value, op: str) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output() or uses[0].node.op_type != op or uses[0].idx != 0:
        return None
    return uses[0].node


def drop_dead(graph: ir.Graph, values: list[ir.Value | None]) -> None:
    """Remove the nodes and initializers behind ``values`` (recursively) that nothing reads any more."""
    pending = [v for v in values if v is not None]
    while pending:
        value = pending.pop()
        node = value.producer()
        if node is None:
            unused = not value.uses() and not value.is_graph_input() and not value.is_graph_output()
            if unused and value.is_initializer() and graph.initializers.get(value.name) is value:  # type: ignore[arg-type]  # an initializer is named
                del graph.initializers[value.name]  # type: ignore[arg-type]  # an initializer is named
            continue
        if node.graph is not graph or any(o.uses() or o.is_graph_output() for o in node.outputs):
            continue
        inputs = list(node.inputs)
        graph.remove(node, safe=True)
        pending += [v for v in inputs if v is not None]


def fold_key_transposes(model: ir.Model) -> int:
    """Replace each proven Reshape → Transpose(0, 2, 1) → Reshape key transpose by one Transpose; the count."""
    graph = model.graph
    folded = 0
    for first in list(graph):
        if first.op_type != "Reshape" or first.graph is not graph:
            continue
        x = first.inputs[0]
        if x is None or x.shape is None or x.shape.rank() < 3:
            continue
        rank = x.shape.rank()
        swap = _single_user(first.outputs[0], "Transpose")
        if swap is None or list(swap.attributes["perm"].value) != [0, 2, 1]:
            continue
        last = _single_user(swap.outputs[0], "Reshape")
        if last is None or last.outputs[0].is_graph_output():
            continue
        leading: list[_Entry] = [("dim", i) for i in range(rank - 2)]
        if _target(first.inputs[1], x, rank) != [-1, ("dim", rank - 2), ("dim", rank - 1)]:
            continue
        if _target(last.inputs[1], x, rank) != [*leading, ("dim", rank - 1), ("dim", rank - 2)]:
            continue
        perm = [*range(rank - 2), rank - 1, rank - 2]
        node = ir.node("Transpose", [x], attributes={"perm": perm}, name=f"{last.name}_folded_transpose")
        out, result = node.outputs[0], last.outputs[0]
        out.shape, out.type = result.shape, result.type  # the type carries the dtype
        graph.insert_before(last, node)
        result.replace_all_uses_with(out)
        dead = [first.inputs[1], last.inputs[1]]
        graph.remove([last, swap, first], safe=True)
        out.name = result.name
        drop_dead(graph, dead)
        folded += 1
    return folded


def fold_constant_reshapes(model: ir.Model) -> int:
    """Replace each Reshape whose data and shape are both stored constants by the reshaped constant; the count.

    Exporters (PaddlePaddle's, for one) write a convolution's bias as ``Reshape(bias, [1, C, 1, 1])`` feeding an
    ``Add``; as a constant it becomes a per-channel slot of its group. Only the one-use case is folded, so the
    original constant can go."""
    graph = model.graph
    folded = 0
    for node in list(graph):
        if node.op_type != "Reshape" or node.graph is not graph or len(node.inputs) < 2:
            continue
        data, shape = node.inputs[0], node.inputs[1]
        if not stored(data) or _ints(shape) is None or len(data.uses()) != 1:
            continue
        array = data.const_value.numpy()  # type: ignore[union-attr]  # stored(): a constant
        allowzero = "allowzero" in node.attributes and node.attributes["allowzero"].value
        target = [array.shape[i] if d == 0 and not allowzero else d for i, d in enumerate(_ints(shape))]  # type: ignore[arg-type]  # _ints() checked not None above
        out = node.outputs[0]
        if out.is_graph_output():
            continue
        value = ir.Value(name=out.name, const_value=ir.tensor(array.reshape(target), name=out.name))
        value.shape, value.dtype = ir.Shape(array.reshape(target).shape), value.const_value.dtype  # type: ignore[union-attr]  # const_value given in the line above
        out.replace_all_uses_with(value)
        graph.remove(node, safe=True)
        graph.register_initializer(value)
        drop_dead(graph, [data, shape])
        folded += 1
    return folded


def infer_shapes(model: ir.Model) -> None:
    """ONNX shape inference, best effort: a model it cannot read keeps the shapes it has (callers that follow
    recorded shapes skip, with a reason, what stays unknown)."""
    from onnx_ir.passes.common import ShapeInferencePass

    with contextlib.suppress(Exception):
        ShapeInferencePass()(model)


def prepare_graph(model: ir.Model, heads: bool = False) -> None:
    """Make structured units provable in place: lift Constant nodes to initializers (stored tensors can be sliced,
    a head count rewritten), fold constant Reshapes, record shapes by inference (head and pooling axes are
    followed through recorded shapes) and, with ``heads``, fold the exporters' key transposes."""
    from onnx_ir.passes.common import LiftConstantsToInitializersPass

    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    fold_constant_reshapes(model)
    infer_shapes(model)  # without recorded shapes some units are skipped, with why
    if heads:
        fold_key_transposes(model)
