"""Models TensorRT's ONNX parser cannot read, recognised from the ONNX file before any parsing, with what to do.

The parser's own message for these is a node name and ``false``. Two families come up in practice:

* ONNX Runtime's quantization formats: dynamic quantization (``DynamicQuantizeLinear`` + ``MatMulInteger`` /
  ``ConvInteger``, what ``onnxruntime.quantization.quantize_dynamic`` writes), the QOperator format
  (``QLinearMatMul``, ``QLinearConv``, ...) and its blocked int4 ``MatMulNBits``. TensorRT reads quantization only
  as QuantizeLinear/DequantizeLinear (Q/DQ) pairs around float ops.
* ONNX Runtime's own operators (domain ``com.microsoft``: fused attention, ``FusedMatMul``,
  ``SkipLayerNormalization`` ...), which an ONNX Runtime-optimised model file holds and no other runtime
  implements.
"""

from __future__ import annotations

import onnx

from graphprune.errors import GraphpruneError

# Standard-domain ops of ONNX Runtime's integer quantization formats (neither is Q/DQ).
INTEGER_QUANTIZATION_OPS: frozenset[str] = frozenset(
    {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv"}
)
_ORT_DOMAIN = "com.microsoft"


def check_parsable(model: onnx.ModelProto, name: str) -> None:
    """One-line error, saying what to build instead, for a model TensorRT's ONNX parser cannot read; ``name``
    is how the message refers to the file."""
    quantized = sorted({n.op_type for n in model.graph.node if _is_integer_quantization(n)})
    if quantized:
        raise GraphpruneError(
            f"{name} is quantized for ONNX Runtime ({_first(quantized)}): TensorRT reads Q/DQ quantization "
            "only (QuantizeLinear/DequantizeLinear pairs); build the float model it was quantized from, or "
            "quantize that one to Q/DQ (graphprune quantize)"
        )
    contrib = sorted({n.op_type for n in model.graph.node if n.domain == _ORT_DOMAIN})
    if contrib:
        raise GraphpruneError(
            f"{name} uses ONNX Runtime's own operators ({_first(contrib)}, domain {_ORT_DOMAIN}), which TensorRT "
            "cannot parse: build the model as exported, before ONNX Runtime's optimizer fused it"
        )


def _is_integer_quantization(node: onnx.NodeProto) -> bool:
    if node.domain in ("", "ai.onnx"):
        return node.op_type in INTEGER_QUANTIZATION_OPS
    return node.domain == _ORT_DOMAIN and (
        node.op_type.startswith("QLinear")
        or node.op_type in ("MatMulNBits", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm", "QAttention")
    )


def _first(ops: list[str], shown: int = 4) -> str:
    return ", ".join(ops[:shown]) + (f" and {len(ops) - shown} more" if len(ops) > shown else "")
