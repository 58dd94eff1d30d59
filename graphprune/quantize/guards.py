"""Move the exporter's softmax NaN guard past the probabilities·V MatMul, onto a tensor that is head_dim/seq
times smaller.

PyTorch's ONNX export of ``scaled_dot_product_attention`` writes ``Where(IsNaN(p), 0, p) @ V`` with
``p = Softmax(scores + mask)``: a query row whose keys are all masked (-inf) gives NaN probabilities, and the guard
makes its output 0. On ONNX Runtime's CPU the two elementwise ops over the ``[batch, heads, seq, seq]``
probabilities cost more than the MatMul itself (all-MiniLM-L6, 512 tokens: 26% of the int8 model's time).

A softmax row is NaN in every element or in none (each element is divided by the row's sum, which is NaN when
any term is), so the guard is a per-row test. The rewrite computes ``Y = p @ V`` and
``Where(IsNaN(ReduceSum(p, last axis)), 0, Y)``: a NaN row of ``p`` gives a NaN row of the sum, and its output
row is set to 0, as before. Every output is equal to the original's whenever V is finite (with a non-finite V,
the original's 0·inf is NaN where the rewrite writes 0). A quantized ``p`` (QuantizeLinear of NaN is undefined)
is then harmless too: whatever the codes of a NaN row, its output row is replaced.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphprune.quantize.attention import is_nan_guard
from graphprune.quantize.qdq import Names, constant


def move_nan_guards(model: ir.Model) -> list[str]:
    """Rewrite every ``Where(IsNaN(Softmax(s)), 0, ·) @ V`` of the main graph in place; the moved guards' names."""
    graph = model.graph
    opset = model.opset_imports.get("", 0)
    if opset < 13:  # Softmax's last-axis semantics and ReduceSum's axes input both start at 13
        return []
    names = Names(graph)
    moved = []
    for where in list(graph):
        matmul = _guarded_matmul(graph, where)
        if matmul is None:
            continue
        test = where.inputs[0].producer()  # type: ignore[union-attr]  # checked by _guarded_matmul
        p, zero = where.inputs[2], where.inputs[1]
        assert test is not None and p is not None and zero is not None
        y = matmul.outputs[0]
        uses = list(y.uses())
        label = str(where.name or y.name)
        axes = constant(graph, names, f"{label}_axes", np.array([-1], np.int64))
        total = ir.Value(name=names(f"{label}_row_sum"))
        nan = ir.Value(name=names(f"{label}_row_nan"))
        guarded = ir.Value(name=names(f"{y.name}_guarded"), type=y.type, shape=y.shape)
        added = [
            ir.Node(
                "",
                "ReduceSum",
                [p, axes],
                [ir.AttrInt64("keepdims", 1)],
                outputs=[total],
                name=names(f"{label}_RowSum"),
            ),
            ir.Node("", "IsNaN", [total], outputs=[nan], name=names(f"{label}_RowIsNaN")),
            ir.Node("", "Where", [nan, zero, y], outputs=[guarded], name=names(f"{label}_RowGuard")),
        ]
        matmul.replace_input_with(0, p)
        graph.insert_after(matmul, added)
        for use in uses:
            use.node.replace_input_with(use.idx, guarded)
        graph.remove([where, test], safe=True)
        moved.append(label)
    return moved


def _guarded_matmul(graph: ir.Graph, where: ir.Node) -> ir.Node | None:
    """The MatMul that alone reads a softmax NaN guard ``where`` as its first operand, else None."""
    if where.op_type != "Where" or where.domain not in ("", "ai.onnx") or not is_nan_guard(where):
        return None
    cond, _, p = where.inputs
    softmax = p.producer() if p is not None else None
    if softmax is None or softmax.op_type != "Softmax" or softmax.domain not in ("", "ai.onnx"):
        return None
    axis = softmax.attributes.get_int("axis", -1)
    rank = p.shape.rank() if p is not None and p.shape is not None else None
    if axis != -1 and (rank is None or axis != rank - 1):
        return None
    if len(cond.uses()) != 1 or cond in graph.outputs:  # type: ignore[union-attr]  # cond has a producer
        return None
    out = where.outputs[0]
    uses = list(out.uses())
    if out in graph.outputs or len(uses) != 1 or uses[0].idx != 0:
        return None
    matmul = uses[0].node
    if matmul.op_type != "MatMul" or matmul.domain not in ("", "ai.onnx") or matmul.graph is not graph:
        return None
    if matmul.outputs[0] in graph.outputs:
        return None
    return matmul
