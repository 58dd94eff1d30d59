"""Write the residual ``Add`` in front of a ``LayerNormalization`` as a two-input ``Sum``, so that ONNX Runtime
keeps its vectorised LayerNormalization kernel instead of fusing the pair into ``SkipLayerNormalization``.

ONNX Runtime's CPU optimiser fuses ``LayerNormalization(Add(x, skip))`` into its SkipLayerNormalization contrib op,
whose CPU kernel (1.32) is a scalar loop per row with a division per element. On a ``[512, 384]`` activation it
took 1.0 ms where the Add and the LayerNormalization kernel it replaced took 0.16 ms (measured here, one thread);
in all-MiniLM-L6's int8 model its 12 instances were 11-14% of the time (BENCHMARKS.md, "Fused attention for ONNX
Runtime"). The fusion matches ``Add`` only. ``Sum`` of two tensors is ``Add`` (same multidirectional broadcast,
one float addition per element), so the rewritten graph computes exactly the same numbers, and ONNX Runtime runs
the Sum and the LayerNormalization as written.

Only an Add whose one reader is the LayerNormalization is rewritten: a sum that also feeds the next residual (a
pre-norm block) is what the fused kernel's optional fourth output serves, and is left as it is.
"""

from __future__ import annotations

import onnx_ir as ir

from graphprune.quantize.qdq import Names

_DEFAULT = ("", "ai.onnx")


def sum_before_layer_norms(model: ir.Model) -> list[str]:
    """Rewrite, in place, each main-graph ``Add`` read only by a LayerNormalization's input as ``Sum``; the
    rewritten sums' names."""
    graph = model.graph
    if model.opset_imports.get("", 0) < 17:  # LayerNormalization is a default-domain op from 17
        return []
    names = Names(graph)
    done = []
    for norm in list(graph):
        if norm.op_type != "LayerNormalization" or norm.domain not in _DEFAULT or not norm.inputs:
            continue
        add = norm.inputs[0].producer() if norm.inputs[0] is not None else None
        if add is None or add.op_type != "Add" or add.domain not in _DEFAULT or add.graph is not graph:
            continue
        out = add.outputs[0]
        if len(out.uses()) != 1 or out in graph.outputs or any(v is None for v in add.inputs):
            continue
        total = ir.Value(name=names(f"{out.name}_sum"), type=out.type, shape=out.shape)
        graph.insert_before(
            add, ir.Node("", "Sum", list(add.inputs), outputs=[total], name=names(f"{add.name}_sum"))
        )
        out.replace_all_uses_with(total)
        graph.remove(add, safe=True)
        done.append(str(total.name))
    return done
