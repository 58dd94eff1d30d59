"""The precision each engine layer can be seen to compute in, read from its ONNX origin.

A layer listed by the builder log or the engine inspector names the ONNX nodes it came from in its metadata
(``[ONNX Layer: NAME]`` entries). Its precision, as far as the ONNX file shows it:

* the stored type of a weight behind a DequantizeLinear among those nodes: ``int8`` (int8 or uint8 codes),
  ``fp8`` (E4M3 or E5M2), ``int4`` (int4 or uint4: weight-only, the activations stay float);
* otherwise the float type of those nodes' outputs (``float16``, ``bfloat16``, ``float32``; joined with ``+``
  when they mix), from ONNX shape inference on the graph without its weights;
* ``""`` for a layer with no ONNX origin (shape computations, reformatting) or whose nodes have no known type.

This is what the file asks for, not the kernel the engine runs: TensorRT records its kernel choice in the tactic
name at build time; TensorRT-RTX builds ahead of time and chooses kernels when the engine is loaded on the user's
GPU, so an RTX build cannot say more than the file does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace

import onnx

from graphprune.tensorrt.logs import LayerInfo

_ORIGIN_RE = re.compile(r"\[ONNX Layer: (.*?)\]")
_CODE_PRECISION: dict[int, str] = {
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "int8",
    onnx.TensorProto.FLOAT8E4M3FN: "fp8",
    onnx.TensorProto.FLOAT8E5M2: "fp8",
    onnx.TensorProto.INT4: "int4",
    onnx.TensorProto.UINT4: "int4",
}
_FLOAT_PRECISION: dict[int, str] = {
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.FLOAT: "float32",
}


def onnx_origins(origin: str) -> list[str]:
    """The ONNX node names in a layer's metadata, in order."""
    return _ORIGIN_RE.findall(origin)


class PrecisionIndex:
    """Per ONNX node name: the precision of the weight it dequantizes, and the float types of its outputs."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        stored = {t.name: t.data_type for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant":
                stored.update((node.output[0], a.t.data_type) for a in node.attribute if a.name == "value")
        self.weight: dict[str, tuple[str, str]] = {}  # DQ node -> (precision, weight name)
        for node in graph.node:
            if node.op_type == "DequantizeLinear" and node.name and node.input[0] in stored:
                label = _CODE_PRECISION.get(stored[node.input[0]])
                if label is not None:
                    self.weight[node.name] = (label, node.input[0])
        types = _value_types(model)
        self.floats: dict[str, set[str]] = {}
        for node in graph.node:
            labels = {_FLOAT_PRECISION[t] for t in (types.get(o, 0) for o in node.output) if t in _FLOAT_PRECISION}
            if node.name and labels:
                self.floats[node.name] = labels

    def of(self, layer: LayerInfo) -> tuple[str, str]:
        """(precision, where it comes from) for one engine layer."""
        names = onnx_origins(layer.origin)
        if not names:
            return "", "no ONNX origin"
        weights = [self.weight[n] for n in names if n in self.weight]
        if weights:
            labels = sorted({label for label, _ in weights})
            return "+".join(labels), f"weight DequantizeLinear of {', '.join(sorted({w for _, w in weights}))}"
        floats = sorted(set().union(*(self.floats.get(n, set()) for n in names)))
        if floats:
            return "+".join(floats), "output types of its ONNX nodes"
        return "", "its ONNX nodes have no known type"


def with_precisions(model: onnx.ModelProto, layers: Sequence[LayerInfo]) -> list[LayerInfo]:
    """``layers`` with :attr:`LayerInfo.precision` and :attr:`LayerInfo.precision_from` filled in."""
    index = PrecisionIndex(model)
    annotated = []
    for layer in layers:
        precision, source = index.of(layer)
        annotated.append(replace(layer, precision=precision, precision_from=source))
    return annotated


def precision_note(product: str, defers_kernels: bool) -> str:
    """What the per-layer precisions mean for this backend, in one sentence."""
    said = "each layer's precision is read from its ONNX origin (its weight's DequantizeLinear type, else its "
    said += "output type), not from a kernel"
    if defers_kernels:
        return (
            f"{said}: {product} chooses kernels when the engine is loaded on the target GPU, so the kernel each "
            "layer runs (and its precision there) is decided at load time, not in this build"
        )
    return f"{said}; the tactic names the kernel {product} chose in this build"


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element types of the graph's values: declared ones, completed by shape inference where it succeeds."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # an op the checker does not know: the declared types only
        inferred = model
    graph = inferred.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for info in [*graph.input, *graph.output, *graph.value_info]:
        if info.type.HasField("tensor_type"):
            types[info.name] = info.type.tensor_type.elem_type
    return types
