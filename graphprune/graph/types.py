"""Element types and ranks of a model's values from ONNX shape inference, run on a weightless copy."""

from __future__ import annotations

import onnx
import onnx_ir as ir

# Initializers up to this many bytes keep their values (shape inference may read them: Reshape targets, axes).
_SMALL = 4096


def value_types(model: ir.Model) -> dict[str, tuple[int, int | None]]:
    """``name -> (onnx element type, rank or None)`` of every main-graph value inference can tell.

    Large initializers become typed graph inputs in the copy given to ``onnx.shape_inference``, so inference
    costs no memory for the weights and never reads external data. Inference is best effort: where it fails,
    only the types the model itself declares are returned.
    """
    proto = ir.to_proto(model)
    graph = proto.graph
    declared = {v.name for v in graph.input}
    kept = []
    for init in graph.initializer:
        small = init.data_location != onnx.TensorProto.EXTERNAL and len(init.raw_data) <= _SMALL
        if small and not init.raw_data and _numel(init) > _SMALL:
            small = False
        if small:
            kept.append(init)
        elif init.name not in declared:
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False).graph
    except Exception:  # best effort: unknown types fall back to what the caller can tell otherwise
        inferred = graph
    types: dict[str, tuple[int, int | None]] = {}
    for vi in [*inferred.input, *inferred.value_info, *inferred.output]:
        if vi.type.HasField("tensor_type"):
            tt = vi.type.tensor_type
            types[vi.name] = (tt.elem_type, len(tt.shape.dim) if tt.HasField("shape") else None)
    for name, value in model.graph.initializers.items():
        if value.const_value is not None:
            types[name] = (int(value.const_value.dtype), len(value.const_value.shape))
    return types


def _numel(tensor: onnx.TensorProto) -> int:
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count
