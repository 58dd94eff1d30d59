"""Read and write a target's stored tensor, and see it as its consumers do (dequantized where it is quantized)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphprune.errors import GraphpruneError
from graphprune.graph.stored import read_array, replace_tensor, stored_tensor
from graphprune.graph.targets import Target


@dataclass
class StoredWeight:
    """A target's tensor as stored, and how to turn it into the float values its consumers multiply by.

    ``scale`` and ``zero_point`` broadcast against ``values`` (blocked DequantizeLinear parameters are
    repeated along their axis). Sub-byte integers (int4/uint4) are held unpacked, one element per value;
    onnx-ir packs them again when the model is written.
    """

    value: ir.Value  # the initializer or Constant output in the model
    values: np.ndarray  # stored values (writable copy)
    scale: np.ndarray | None = None  # DequantizeLinear scale
    zero_point: np.ndarray | None = None  # DequantizeLinear zero point

    def effective(self) -> np.ndarray:
        """The values the consumers see, in float32 (or the stored float dtype)."""
        if self.scale is None:
            return self.values
        zero = np.float32(0) if self.zero_point is None else self.zero_point.astype(np.float32)
        return (self.values.astype(np.float32) - zero) * self.scale.astype(np.float32)

    def zero_value(self) -> np.ndarray | int:
        """The stored value that means zero: the zero point under DequantizeLinear, else 0."""
        if self.zero_point is None:  # a zero of the stored type: a Python 0 would not cast to uint8 safely
            return np.zeros((), dtype=self.values.dtype)
        return self.zero_point

    def tensor(self, values: np.ndarray | None = None) -> ir.Tensor:
        """``values`` (default: the current ones) as a tensor of the stored name and element type."""
        old = stored_tensor(self.value)
        return ir.Tensor(self.values if values is None else values, dtype=old.dtype, name=old.name)

    def write(self, values: np.ndarray) -> None:
        """Store ``values`` (same shape and dtype) in the model, replacing the tensor it held."""
        self.values = values
        replace_tensor(self.value, self.tensor(values))


def read_weight(
    stored: Mapping[str, ir.Value], target: Target, source: ir.TensorProtocol | None = None
) -> StoredWeight:
    """The stored tensor of ``target`` (a writable copy) with its DequantizeLinear parameters, if any.

    ``stored`` is :func:`stored_values` of the graph (computed once per pass, not once per weight); ``source``
    reads the values from that tensor instead of the one the model holds now.
    """
    value = stored[target.name]
    values = read_array(source or stored_tensor(value))
    if "DequantizeLinear" not in target.through:
        return StoredWeight(value, values)
    node = next(n for n, i in value.uses() if n.op_type == "DequantizeLinear" and i == 0)
    axis = node.attributes.get_int("axis", 1)
    block = node.attributes.get_int("block_size", 0)
    params = [p for p in node.inputs[1:] if p is not None]
    scale, *zero = (_parameter(stored, p, values.shape, axis, block) for p in params)
    return StoredWeight(value, values, scale, zero[0] if zero else None)


def _parameter(
    stored: Mapping[str, ir.Value], value: ir.Value, shape: tuple[int, ...], axis: int, block: int
) -> np.ndarray:
    """A DequantizeLinear scale or zero point, made to broadcast against the stored weight."""
    if value.name is None or value.name not in stored or stored[value.name] is not value:
        raise GraphpruneError(f"DequantizeLinear parameter {value.name} is not a constant")
    array = read_array(stored_tensor(value))
    if array.ndim == 0:
        return array
    axis %= len(shape)
    if block:  # blocked quantization (opset 21): one parameter per block of ``block`` along the axis
        return np.repeat(array, block, axis=axis)[tuple(slice(0, n) for n in shape)]
    if array.ndim == len(shape):
        return array
    broadcast = [1] * len(shape)
    broadcast[axis] = array.shape[0]
    return array.reshape(broadcast)
