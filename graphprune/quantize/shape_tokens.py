"""Read the shape arithmetic exporters write (``Shape`` → ``Gather``/``Slice`` → ``Unsqueeze`` → ``Concat``) as a
list of symbolic sizes, so a pattern matcher can tell what a ``Reshape`` with a computed target does.

A size is a *token*: a known ``int``; a named symbolic dimension (``str``, from the value's type, e.g. the
exporter's ``"batch"``); or ``(id(value), axis)`` for a dimension nothing names. Two equal tokens are the same
size at run time; unequal ones may still be equal, so a matcher that needs equality refuses on a mismatch.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

Token = int | str | tuple[int, int]
_INTEGER_TYPES = (ir.DataType.INT64, ir.DataType.INT32)


def dim_token(value: ir.Value, axis: int) -> Token | None:
    """The token of ``value``'s size along ``axis`` (negative counts from the end: needs a known rank)."""
    shape = value.shape
    rank = shape.rank() if shape is not None else None
    if axis < 0:
        if rank is None:
            return None
        axis += rank
    if rank is not None:
        if not 0 <= axis < rank:
            return None
        dim = shape[axis]  # type: ignore[index]  # rank is known, so the shape is
        if isinstance(dim, int):
            return dim
        if dim.value is not None:
            return str(dim.value)
    return (id(value), axis)


def shape_tokens(value: ir.Value | None, depth: int = 0) -> list[Token] | None:
    """The elements of a 1-D (or scalar) integer tensor computed from shapes and constants, else None."""
    if value is None or depth > 32:
        return None
    const = ir.convenience.get_const_tensor(value)
    if const is not None:
        array = const.numpy()
        return [int(x) for x in array.reshape(-1)] if np.issubdtype(array.dtype, np.integer) else None
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    op, inputs = node.op_type, node.inputs
    if op == "Shape":
        return _shape(node)
    if op == "Concat":
        parts = [shape_tokens(v, depth + 1) for v in inputs]
        return None if any(p is None for p in parts) else [t for p in parts for t in p]  # type: ignore[union-attr]
    if op in ("Unsqueeze", "Squeeze", "Identity"):  # a scalar and its 1-element vector read the same
        return shape_tokens(inputs[0], depth + 1)
    if op == "Cast":
        target = node.attributes.get_int("to", 0)
        return shape_tokens(inputs[0], depth + 1) if ir.DataType(target) in _INTEGER_TYPES else None
    if op == "Gather" and node.attributes.get_int("axis", 0) == 0:
        return _gather(inputs[0], shape_tokens(inputs[1], depth + 1), depth)
    if op == "Slice":
        return _slice(node, depth)
    return None


def _shape(node: ir.Node) -> list[Token] | None:
    x = node.inputs[0]
    rank = x.shape.rank() if x is not None and x.shape is not None else None
    if x is None or rank is None:
        return None
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", rank)
    tokens = [dim_token(x, i) for i in range(rank)][start:end]
    return None if any(t is None for t in tokens) else tokens  # type: ignore[return-value]


def _gather(data: ir.Value | None, index: list[Token] | None, depth: int) -> list[Token] | None:
    positions = [i for i in index if isinstance(i, int)] if index is not None else []
    if data is None or index is None or len(positions) != len(index):
        return None
    producer = data.producer()
    if producer is not None and producer.op_type == "Shape" and not producer.attributes.get_int("start", 0):
        x = producer.inputs[0]  # Shape(x)[i] needs no rank for i ≥ 0 (legacy exports carry no shapes)
        if x is not None and all(i >= 0 for i in positions):
            found = [dim_token(x, i) for i in positions]
            return [t for t in found if t is not None] if None not in found else None
    tokens = shape_tokens(data, depth + 1)
    if tokens is None or not all(-len(tokens) <= i < len(tokens) for i in positions):
        return None
    return [tokens[i] for i in positions]


def _slice(node: ir.Node, depth: int) -> list[Token] | None:
    tokens = shape_tokens(node.inputs[0], depth + 1)
    bounds = [shape_tokens(v, depth + 1) if v is not None else None for v in node.inputs[1:5]]
    bounds += [None] * (4 - len(bounds))
    starts, ends, axes, steps = bounds
    if tokens is None or starts is None or ends is None or len(starts) != 1 or len(ends) != 1:
        return None
    if (axes is not None and axes not in ([0], [-1])) or (steps is not None and steps != [1]):
        return None
    start, end = starts[0], ends[0]
    if not isinstance(start, int) or not isinstance(end, int):
        return None
    return tokens[start:end]  # Python's slice clamps like ONNX's (INT64 min/max included)
