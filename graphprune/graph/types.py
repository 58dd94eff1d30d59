"""Element types and ranks of a model's values from ONNX shape inference, run on a weightless serialisation."""

from __future__ import annotations

import onnx
import onnx_ir as ir

# Initializers up to this many elements keep their values (shape inference may read them: Reshape targets, axes).
_SMALL = 4096


def value_types(model: ir.Model) -> dict[str, tuple[int, int | None]]:
    """``name -> (onnx element type, rank or None)`` of every main-graph value inference can tell.

    Only the graph is serialised (an ``ir.GraphView`` whose large initializers are typed graph inputs), so
    inference copies no weight and never reads external data. Inference is best effort: where it fails, only
    the types the model itself declares are returned.
    """
    graph = model.graph
    small, large = [], []
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        if tensor.size <= _SMALL and not isinstance(tensor, ir.ExternalTensor):
            small.append(value)
        elif value not in graph.inputs:
            shape = ir.Shape(tensor.shape.numpy())  # a concrete ir.Shape: Value does not take a ShapeProtocol
            large.append(ir.Value(name=value.name, type=ir.TensorType(tensor.dtype), shape=shape))
    types: dict[str, tuple[int, int | None]] = {}
    for value in [*graph.inputs, *(v for node in graph for v in node.outputs)]:
        if value.name and value.dtype is not None:
            types[value.name] = (int(value.dtype), None if value.shape is None else len(value.shape))
    view = ir.GraphView([*graph.inputs, *large], graph.outputs, nodes=graph, initializers=small)
    proto = onnx.ModelProto(ir_version=model.ir_version)
    for domain, version in model.opset_imports.items():
        proto.opset_import.add(domain=domain, version=version)
    try:
        proto.functions.extend(ir.serde.serialize_function(f) for f in model.functions.values())
        ir.serde.serialize_graph_into(proto.graph, view)  # type: ignore[arg-type]  # onnx-ir's GraphView misses its own protocol as typed
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False).graph
    except Exception:  # best effort: unknown types fall back to what the caller can tell otherwise
        inferred = onnx.GraphProto()
    for vi in [*inferred.input, *inferred.value_info, *inferred.output]:
        if vi.type.HasField("tensor_type"):
            tt = vi.type.tensor_type
            types[vi.name] = (tt.elem_type, len(tt.shape.dim) if tt.HasField("shape") else None)
    for name, value in graph.initializers.items():
        if value.const_value is not None:
            types[name] = (int(value.const_value.dtype), len(value.const_value.shape))
    return types
