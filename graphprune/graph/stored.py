"""Stored tensors of an onnx-ir graph: initializers and the values of Constant nodes, read and replaced by name."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def stored_values(graph: ir.Graph) -> dict[str, ir.Value]:
    """Every value of ``graph`` whose contents are stored in the model: initializers, then Constant outputs."""
    found: dict[str, ir.Value] = {name: v for name, v in graph.initializers.items() if v.const_value is not None}
    for node in graph:
        if node.op_type == "Constant" and node.domain == "" and "value" in node.attributes:
            found.setdefault(node.outputs[0].name or "", node.outputs[0])
    return found


def stored_tensor(value: ir.Value) -> ir.TensorProtocol:
    """The tensor behind a stored value (an initializer's, or its Constant node's ``value`` attribute)."""
    if value.const_value is not None:
        return value.const_value
    node = value.producer()
    if node is None or node.op_type != "Constant":
        raise KeyError(f"{value.name} is not a stored tensor")
    return node.attributes["value"].as_tensor()


def stored_shape(value: ir.Value) -> tuple[int, ...]:
    return tuple(stored_tensor(value).shape.numpy())  # a stored tensor's dimensions are all known


def stored_dtype(value: ir.Value) -> str:
    """Numpy name of the stored element type: "float32", "bfloat16", "int8", "int4"..."""
    return np.dtype(stored_tensor(value).dtype.numpy()).name


def replace_tensor(value: ir.Value, tensor: ir.TensorProtocol) -> None:
    """Make ``tensor`` the stored contents of ``value`` (same name, dtype and shape as before)."""
    node = value.producer()
    if node is not None and node.op_type == "Constant" and value.const_value is None:
        node.attributes["value"] = ir.AttrTensor("value", tensor)
    else:
        value.const_value = tensor


def read_array(tensor: ir.TensorProtocol) -> np.ndarray:
    """A writable copy of a tensor's values, read from its file when it is external (one read, no mapping)."""
    if isinstance(tensor, ir.ExternalTensor) and tensor.dtype.bitwidth >= 8 and tensor.size:
        dtype = np.dtype(tensor.dtype.numpy()).newbyteorder("<")
        array = np.fromfile(tensor.path, dtype=dtype, count=tensor.size, offset=tensor.offset or 0)
        if array.size != tensor.size:
            raise ValueError(f"external data of {tensor.name} is shorter than its shape")
        return array.reshape(tensor.shape.numpy())
    array = np.array(tensor.numpy(), copy=True)
    if isinstance(tensor, ir.ExternalTensor):
        tensor.release()
    return array
