"""Where a per-channel division of an activation can be folded exactly: the producer's parameters.

SmoothQuant divides an activation ``x`` by ``s`` per channel (its last axis) and multiplies the consumers' K rows
by ``s``. The division must cost nothing at run time, so it is folded into whatever wrote ``x``, walking back
through ops that are linear per channel:

* LayerNormalization (over the last axis): its scale and bias;
* Mul by a stored per-channel vector (an RMSNorm weight): that vector;
* Add of a stored per-channel vector (a bias), then the other input;
* Mul of two computed tensors (SwiGLU's ``act(gate) * up``): one operand only, the one that can be scaled;
* MatMul/Gemm by a stored weight (the previous projection): its output columns (and its bias).

Every tensor on the way must be read by that walk alone (not a graph output, not also read elsewhere), and every
stored parameter by its one node, so the rewrite changes nothing else. A small module of its own, so it can move
onto the coupling engine's scale folds (graph/) later.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir


@dataclass(frozen=True)
class Edit:
    """Divide ``value`` (a stored tensor) by the scales along ``axis``."""

    value: ir.Value
    axis: int


@dataclass(frozen=True)
class Fold:
    edits: tuple[Edit, ...]
    description: str  # "LayerNormalization ln_1", "MatMul up_proj columns"...


def find_fold(x: ir.Value, width: int) -> Fold | str:
    """How to fold ``x / s`` into ``x``'s producers (``width`` channels on the last axis), or why it cannot be."""
    edits: list[Edit] = []
    value = x
    while True:
        node = value.producer()
        if node is None:
            return "a graph input (nothing writes it)"
        op = node.op_type
        if op == "LayerNormalization":
            if node.attributes.get_int("axis", -1) not in (-1, _rank(value) - 1):
                return "LayerNormalization over more than the last axis"
            params = [p for p in node.inputs[1:3] if p is not None]
            if not all(_vector(p, width, node) for p in params):
                return "LayerNormalization without stored per-channel scale and bias"
            edits += [Edit(p, 0) for p in params]
            return Fold(tuple(edits), f"LayerNormalization {node.name}")
        if op in ("Mul", "Add"):
            a, b = node.inputs[0], node.inputs[1]
            assert a is not None and b is not None
            stored = [v for v in (a, b) if _vector(v, width, node)]
            if op == "Mul" and stored:
                edits.append(Edit(stored[0], len(stored[0].shape or ()) - 1))
                return Fold(tuple(edits), f"Mul {node.name} (per-channel weight)")
            if op == "Add" and stored:
                edits.append(Edit(stored[0], len(stored[0].shape or ()) - 1))
                other = b if stored[0] is a else a
            elif op == "Mul":
                # scaling one factor scales the product, if that factor has every channel (no broadcast)
                other = next((v for v in (b, a) if _private(v) and _last_dim(v) == width), None)  # type: ignore[assignment]  # None: returned just below
                if other is None:
                    return f"no operand of {op} {node.name} can carry the scales alone"
            else:
                return f"Add {node.name} of two computed tensors (a residual): both would need the scales"
            if not _private(other):
                return f"{other.name} is read elsewhere"
            value = other
            continue
        if op in ("MatMul", "Gemm"):
            w = node.inputs[1]
            if w is None or not _owned(w, node) or len(w.shape or ()) != 2:
                return f"{op} {node.name} has no stored 2-D weight of its own"
            trans_b = op == "Gemm" and node.attributes.get_int("transB", 0) != 0
            edits.append(Edit(w, 0 if trans_b else 1))
            bias = node.inputs[2] if op == "Gemm" and len(node.inputs) > 2 else None
            if bias is not None:
                if not _vector(bias, width, node):
                    return f"Gemm {node.name} has a bias that is not per channel"
                edits.append(Edit(bias, len(bias.shape or ()) - 1))
            return Fold(tuple(edits), f"{op} {node.name} output columns")
        return f"written by {op} {node.name}, which has no per-channel parameter"


def _rank(value: ir.Value) -> int:
    return len(value.shape) if value.shape is not None else -1


def _last_dim(value: ir.Value) -> int | None:
    shape = value.shape
    return shape[-1] if shape is not None and len(shape) and isinstance(shape[-1], int) else None


def _owned(value: ir.Value, node: ir.Node) -> bool:
    """A stored tensor that only ``node`` reads."""
    return (
        value.is_initializer()
        and value.const_value is not None
        and not value.is_graph_input()
        and not value.is_graph_output()
        and all(u.node is node for u in value.uses())
    )


def _vector(value: ir.Value, width: int, node: ir.Node) -> bool:
    """A stored tensor of ``node`` alone, one value per channel of the last axis (leading axes of size 1)."""
    if not _owned(value, node):
        return False
    dims = list(value.const_value.shape.numpy())  # type: ignore[union-attr]  # _owned: a stored tensor
    return bool(dims) and dims[-1] == width and all(d == 1 for d in dims[:-1])


def _private(value: ir.Value) -> bool:
    """A computed tensor read by exactly one node and not a graph output."""
    return value.producer() is not None and len(value.uses()) == 1 and not value.is_graph_output()
