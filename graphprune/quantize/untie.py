"""Give a tied output head its own weight, so it can be quantized while the embedding table stays float.

Many language models read one table twice: Gather(table, ids) for the embeddings and MatMul(h, Transpose(table))
for the logits. The Gather must keep float values (a quantized table would need a dequantizing Gather), but the
head is one of the largest matrix multiplications of the model. The rewrite is exact: the MatMul reads a stored
copy laid out as it multiplies (the Transpose applied once, here), and the Transpose it read through goes away
when nothing else reads it. The copy costs one more table in the file (in int8 after quantization: a quarter).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphprune.graph.stored import read_array, stored_tensor
from graphprune.quantize.qdq import Names


def untie_head_tables(model: ir.Model) -> list[str]:
    """Give each MatMul that reads a Gather's table (directly or through one Transpose) a copy; the names tied."""
    graph = model.graph
    names = Names(graph)
    untied = []
    for name, value in list(graph.initializers.items()):
        uses = list(value.uses())
        if value.const_value is None or not any(u.node.op_type == "Gather" and u.idx == 0 for u in uses):
            continue
        for use in uses:
            node, perm = use.node, None
            if node.op_type == "Transpose" and use.idx == 0 and len(node.outputs[0].uses()) == 1:
                perm = node.attributes.get_ints("perm") or [1, 0]
                node, index = next(iter(node.outputs[0].uses()))
            else:
                index = use.idx
            if node.op_type != "MatMul" or index != 1 or node.graph is not graph:
                continue
            array = read_array(stored_tensor(value))
            copy = np.ascontiguousarray(np.transpose(array, perm) if perm is not None else array)
            new_name = names(f"{name}_matmul")
            new = ir.Value(name=new_name, const_value=ir.Tensor(copy, name=new_name), shape=ir.Shape(copy.shape))
            new.type = ir.TensorType(new.const_value.dtype)  # type: ignore[union-attr]  # given on the line above
            graph.register_initializer(new)
            reader = node.inputs[1]
            node.replace_input_with(1, new)
            if perm is not None and reader is not None and not reader.uses():
                graph.remove(reader.producer(), safe=True)  # type: ignore[arg-type]  # perm set: a Transpose's output
            untied.append(name)
    return untied
