"""Raise a model's default-domain opset to what a precision's Q/DQ needs, only when that changes no operator.

FP8 QuantizeLinear/DequantizeLinear need opset 19, blocked int4 DequantizeLinear opset 21. The upgrade is exact
when ONNX's own version converter (``onnx.version_converter``), run on the graph without its weights, moves every
node across unchanged (same op, inputs, outputs and attributes: most new versions only admit new types); then only
the import changes here. Otherwise the model is refused in one line naming the operators that would change.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

from graphprune.calibration.taps import default_opset
from graphprune.errors import GraphpruneError

_IR_FOR_OPSET = {19: 9, 21: 10}  # float8 types arrived with IR version 9, int4 with 10
_SMALL = 4096  # initializers up to this many elements travel with the graph (shape constants, axes)


def require_opset(model: ir.Model, needed: int, what: str) -> int | None:
    """Make the default-domain opset at least ``needed``; the old opset when it was raised, else None."""
    current = default_opset(model)
    if current >= needed:
        return None
    changed = _changed_by_conversion(model, needed)
    if changed:
        raise GraphpruneError(
            f"{what} needs opset {needed} and the model has opset {current}; raising it is not exact because "
            f"{', '.join(changed[:4])} would change: convert the model first (onnx.version_converter)"
        )
    domain = "" if "" in model.opset_imports else "ai.onnx"
    model.opset_imports[domain] = needed
    model.ir_version = max(model.ir_version or 0, max(v for k, v in _IR_FOR_OPSET.items() if k <= needed))
    return current


def _changed_by_conversion(model: ir.Model, target: int) -> list[str]:
    """Op types of the nodes ONNX's converter rewrites (or every op, when it cannot convert the graph)."""
    graph = model.graph
    small, large = [], []
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is not None and tensor.size <= _SMALL and not isinstance(tensor, ir.ExternalTensor):
            small.append(value)
        elif tensor is not None and value not in graph.inputs:
            shape = ir.Shape(tensor.shape.numpy())  # a concrete ir.Shape: Value does not take a ShapeProtocol
            large.append(ir.Value(name=value.name, type=ir.TensorType(tensor.dtype), shape=shape))
    view = ir.GraphView([*graph.inputs, *large], graph.outputs, nodes=graph, initializers=small)
    proto = onnx.ModelProto(ir_version=model.ir_version)
    for domain, version in model.opset_imports.items():
        proto.opset_import.add(domain=domain, version=version)
    ir.serde.serialize_graph_into(proto.graph, view)  # type: ignore[arg-type]  # onnx-ir's GraphView misses its own protocol as typed
    before = [_signature(n) for n in proto.graph.node]
    try:
        converted = onnx.version_converter.convert_version(proto, target)
    except Exception:  # the converter has no adapter for some op: nothing proves the upgrade exact
        return sorted({n.op_type for n in proto.graph.node})
    after = [_signature(n) for n in converted.graph.node]
    if len(after) != len(before):
        kept = set(after)
        return sorted({sig[0] for sig in before if sig not in kept}) or ["the node count"]
    return sorted({b[0] for b, a in zip(before, after, strict=True) if a != b})


def _signature(node: onnx.NodeProto) -> tuple:
    return (
        node.op_type,
        node.domain,
        tuple(node.input),
        tuple(node.output),
        tuple(a.SerializeToString() for a in node.attribute),
    )
