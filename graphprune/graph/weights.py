"""Read and write a target's stored tensor, and see it as its consumers do (dequantized where it is quantized)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from graphprune.errors import GraphpruneError
from graphprune.graph.targets import Target


@dataclass
class StoredWeight:
    """A target's tensor as stored, and how to turn it into the float values its consumers multiply by."""

    tensor: onnx.TensorProto  # the initializer, or the Constant node's value, edited in place on write
    values: np.ndarray  # stored values (writable copy)
    scale: np.ndarray | None = None  # DequantizeLinear scale, broadcastable to ``values``
    zero_point: np.ndarray | None = None  # DequantizeLinear zero point, broadcastable to ``values``

    def effective(self) -> np.ndarray:
        """The values the consumers see, in float32 (or the stored float dtype)."""
        if self.scale is None:
            return self.values
        zero = 0 if self.zero_point is None else self.zero_point.astype(np.float32)
        return (self.values.astype(np.float32) - zero) * self.scale.astype(np.float32)

    def zero_value(self) -> np.ndarray | int:
        """The stored value that means zero: the zero point under DequantizeLinear, else 0."""
        return 0 if self.zero_point is None else self.zero_point

    def write(self, values: np.ndarray) -> None:
        """Store ``values`` (same shape and dtype) back into the model."""
        if self.tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise GraphpruneError(f"weight {self.tensor.name} is still in external data; load the model with it")
        # Same dtype and shape as read: only the bytes change. Setting raw_data directly avoids building a
        # second TensorProto (from_array + CopyFrom copies every byte twice more).
        for typed in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            self.tensor.ClearField(typed)
        self.tensor.raw_data = np.ascontiguousarray(values).tobytes()
        self.values = values


class WeightStore:
    """Stored tensors of a model by name: initializers and Constant node values."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self._tensors: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self._dequantize: dict[str, onnx.NodeProto] = {}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self._tensors[node.output[0]] = node.attribute[0].t
            if node.op_type == "DequantizeLinear":
                self._dequantize.setdefault(node.input[0], node)

    def tensor(self, name: str) -> onnx.TensorProto:
        return self._tensors[name]

    def read(self, target: Target) -> StoredWeight:
        tensor = self._tensors[target.name]
        values = numpy_helper.to_array(tensor).copy()
        if "DequantizeLinear" not in target.through:
            return StoredWeight(tensor, values)
        node = self._dequantize[target.name]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        scale = self._broadcastable(node.input[1], values.ndim, axis)
        has_zero = len(node.input) > 2 and bool(node.input[2])
        zero = self._broadcastable(node.input[2], values.ndim, axis) if has_zero else None
        return StoredWeight(tensor, values, scale, zero)

    def _broadcastable(self, name: str, rank: int, axis: int) -> np.ndarray:
        if name not in self._tensors:
            raise GraphpruneError(f"DequantizeLinear parameter {name} is not a constant")
        array = numpy_helper.to_array(self._tensors[name])
        if array.ndim == 0:
            return array
        shape = [1] * rank
        shape[axis % rank] = array.shape[0]
        return array.reshape(shape)
