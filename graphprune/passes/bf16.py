"""BF16 conversion on top of ONNX Runtime's FP16 converter: same graph decisions, BF16 values and types.

ONNX Runtime's converter only writes FP16. BF16 wants the same structure (which ops stay FP32, where the Casts go,
which initializers stay float32), so :func:`graphprune.passes.convert.convert` runs it and this module then
(1) stores our BF16 rounding of the original float32 values wherever it stored FP16 ones, and (2) retypes every
FP16 type, Cast and dtype attribute to BF16. Every FP16 in the result is the converter's, since convert refuses
models that already use half precision.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

_DTYPE_ATTRIBUTES = frozenset({"to", "dtype"})  # Cast's target, EyeLike/Random*/Bernoulli/... output types


def to_bfloat16(values: np.ndarray) -> np.ndarray:
    """Round float32 to BF16 (nearest even): zeros stay zeros, non-zeros stay non-zero, overflow saturates."""
    info = ml_dtypes.finfo(ml_dtypes.bfloat16)
    src = np.asarray(values, dtype=np.float32)
    with np.errstate(over="ignore"):
        out = src.astype(ml_dtypes.bfloat16)
    overflow = np.isfinite(src) & ~np.isfinite(out)
    out[overflow] = np.where(src[overflow] > 0, info.max, -info.max).astype(ml_dtypes.bfloat16)
    lost = (src != 0) & (out == 0)
    tiny = np.asarray(info.smallest_subnormal, dtype=ml_dtypes.bfloat16)
    out[lost] = np.where(src[lost] > 0, tiny, -tiny).astype(ml_dtypes.bfloat16)
    return out


def bf16_tensor(name: str, values: np.ndarray) -> TensorProto:
    """A BFLOAT16 TensorProto (numpy_helper does not know ml_dtypes.bfloat16: raw little-endian bytes)."""
    return helper.make_tensor(
        name, TensorProto.BFLOAT16, list(values.shape), values.view(np.uint16).tobytes(), raw=True
    )


def _is_fp16_dtype(attr: onnx.AttributeProto) -> bool:
    return attr.type == AttributeProto.INT and attr.name in _DTYPE_ATTRIBUTES and attr.i == TensorProto.FLOAT16


@dataclass
class Bf16Values:
    """Our BF16 rounding of a model's float32 initializers and node-attribute tensors, taken before conversion."""

    initializers: dict[str, np.ndarray] = field(default_factory=dict)
    attributes: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)  # (node index, attribute name)

    @classmethod
    def capture(cls, model: onnx.ModelProto) -> Bf16Values:
        values = cls()
        for tensor in model.graph.initializer:
            if tensor.data_type == TensorProto.FLOAT:
                values.initializers[tensor.name] = to_bfloat16(numpy_helper.to_array(tensor))
        for index, node in enumerate(model.graph.node):
            for attr in node.attribute:
                if attr.type == AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                    values.attributes[(index, attr.name)] = to_bfloat16(numpy_helper.to_array(attr.t))
        return values

    def apply(self, model: onnx.ModelProto) -> None:
        """Turn the FP16 converter's output into BF16 (before any reordering of the nodes it appended)."""
        graph = model.graph
        for index, tensor in enumerate(graph.initializer):
            if tensor.data_type == TensorProto.FLOAT16:
                graph.initializer[index].CopyFrom(bf16_tensor(tensor.name, self.initializers.pop(tensor.name)))
        for index, node in enumerate(graph.node):
            for attr in node.attribute:
                if attr.type == AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT16:
                    original = self.attributes.get((index, attr.name))
                    if original is None:  # added by the converter (ConstantOfShape's default 0)
                        original = to_bfloat16(numpy_helper.to_array(attr.t).astype(np.float32))
                    attr.t.CopyFrom(bf16_tensor(attr.t.name, original))
                elif _is_fp16_dtype(attr):
                    attr.i = TensorProto.BFLOAT16
        for info in [*graph.input, *graph.output, *graph.value_info]:
            if info.type.tensor_type.elem_type == TensorProto.FLOAT16:
                info.type.tensor_type.elem_type = TensorProto.BFLOAT16
