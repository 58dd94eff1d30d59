"""The Q/DQ nodes themselves: a weight replaced by its codes behind DequantizeLinear, and an activation passed
through QuantizeLinear → DequantizeLinear (or DynamicQuantizeLinear → DequantizeLinear) before its consumers.

Conventions (those of ONNX Runtime's QDQ quantizer and TensorRT's explicit quantization): weight codes keep the
weight's name; the scale and zero point are initializers named ``<weight>_scale`` and ``<weight>_zero_point``,
both per output channel (``axis`` = the output axis), or per block along K (``axis`` = K, ``block_size``) for
int4. Zero points are always written, and are zero for every weight. An activation gets one QuantizeLinear
→ DequantizeLinear pair per consumer, just before it (TensorRT and ONNX Runtime both fuse a pair into the one
node it feeds).
"""

from __future__ import annotations

from collections.abc import Iterable

import ml_dtypes
import numpy as np
import onnx_ir as ir

# The element type of codes (and zero points) per grid: numpy dtype, ONNX type.
CODE_TYPES: dict[str, tuple[np.dtype, ir.DataType]] = {
    "int8": (np.dtype(np.int8), ir.DataType.INT8),
    "uint8": (np.dtype(np.uint8), ir.DataType.UINT8),
    "fp8": (np.dtype(ml_dtypes.float8_e4m3fn), ir.DataType.FLOAT8E4M3FN),
    "int4": (np.dtype(ml_dtypes.int4), ir.DataType.INT4),
}


class Names:
    """Fresh tensor and node names: the wanted one when free, else with a numeric suffix."""

    def __init__(self, graph: ir.Graph) -> None:
        self.taken = set(graph.initializers)
        for node in ir.traversal.RecursiveGraphIterator(graph):
            self.taken.update(str(v.name) for v in node.outputs if v.name)
            if node.name:
                self.taken.add(node.name)
        self.taken.update(str(v.name) for v in graph.inputs if v.name)

    def __call__(self, wanted: str) -> str:
        name, i = wanted, 0
        while name in self.taken:
            i += 1
            name = f"{wanted}_{i}"
        self.taken.add(name)
        return name


def constant(graph: ir.Graph, names: Names, wanted: str, array: np.ndarray, kind: str | None = None) -> ir.Value:
    """A new initializer holding ``array`` (of code type ``kind`` when given)."""
    name = names(wanted)
    dtype = CODE_TYPES[kind][1] if kind else None
    # np.ascontiguousarray would make a scalar 1-D: a per-tensor scale must stay a scalar, or ONNX Runtime's QDQ
    # fusions (and TensorRT) see a per-axis parameter
    tensor = ir.Tensor(np.array(array, copy=True, order="C"), dtype=dtype, name=name)
    value = ir.Value(name=name, const_value=tensor, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype))
    graph.register_initializer(value)
    return value


def dequantize_weight(
    graph: ir.Graph,
    names: Names,
    weight: ir.Value,
    codes: np.ndarray,
    scale: np.ndarray,
    kind: str,
    before: ir.Node,
    axis: int,
    block_size: int | None = None,
) -> ir.Node:
    """Store ``codes`` in ``weight`` and read it through a new DequantizeLinear wherever it was read."""
    uses = list(weight.uses())
    name = str(weight.name)
    dtype = CODE_TYPES[kind][1]
    weight.const_value = ir.Tensor(np.ascontiguousarray(codes), dtype=dtype, name=name)
    weight.type = ir.TensorType(dtype)
    s = constant(graph, names, f"{name}_scale", scale.astype(np.float32))
    z = constant(graph, names, f"{name}_zero_point", np.zeros(scale.shape, CODE_TYPES[kind][0]), kind)
    attrs: list[ir.Attr] = [ir.AttrInt64("axis", axis)]
    if block_size:
        attrs.append(ir.AttrInt64("block_size", block_size))
    out = ir.Value(
        name=names(f"{name}_dequantized"), shape=ir.Shape(codes.shape), type=ir.TensorType(ir.DataType.FLOAT)
    )
    node = ir.Node(
        "", "DequantizeLinear", [weight, s, z], attrs, outputs=[out], name=names(f"{name}_DequantizeLinear")
    )
    graph.insert_before(before, node)
    for use in uses:
        use.node.replace_input_with(use.idx, out)
    return node


def quantize_activation(
    graph: ir.Graph,
    names: Names,
    x: ir.Value,
    consumers: Iterable[tuple[ir.Node, int]],
    scale: float | None,
    zero_point: np.ndarray | None,
    kind: str,
) -> list[ir.Node]:
    """A Q → DQ pair on ``x`` before each of ``consumers`` (node, input index); ``scale`` None: dynamic (uint8).

    One pair per consumer (ONNX Runtime's "dedicated pair"): its CPU graph optimiser fuses an int8 (not uint8)
    QuantizeLinear shared by Q/K/V with none of them, leaving those MatMuls in float.
    """
    name = str(x.name)
    if scale is not None:
        assert zero_point is not None
        s = constant(graph, names, f"{name}_scale", np.array(scale, np.float32))
        z = constant(graph, names, f"{name}_zero_point", zero_point, kind)
    added = []
    for node, index in consumers:
        if scale is None:
            q_outputs = [ir.Value(name=names(f"{name}_{part}")) for part in ("quantized", "scale", "zero_point")]
            q = ir.Node("", "DynamicQuantizeLinear", [x], outputs=q_outputs, name=names(f"{name}_DynamicQuantize"))
            dq_inputs = q_outputs
        else:
            quantized = ir.Value(name=names(f"{name}_quantized"), type=ir.TensorType(CODE_TYPES[kind][1]))
            q = ir.Node("", "QuantizeLinear", [x, s, z], outputs=[quantized], name=names(f"{name}_QuantizeLinear"))
            dq_inputs = [quantized, s, z]
        out = ir.Value(name=names(f"{name}_dequantized"), type=ir.TensorType(ir.DataType.FLOAT), shape=x.shape)
        dq = ir.Node("", "DequantizeLinear", dq_inputs, outputs=[out], name=names(f"{name}_DequantizeLinear"))
        graph.insert_before(node, q)
        graph.insert_before(node, dq)
        node.replace_input_with(index, out)
        added += [q, dq]
    return added
