"""Checks of a model file's tensors before their bytes are used: one line instead of a crash or a wrong model.

A tensor's bytes must match its shape and type (raw data neither short nor long, typed fields of the right count,
no negative dimension), and external data must lie beside the model, inside its directory (onnx refuses anything
else; this check says so without revealing anything about the file outside), within the data file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx import TensorProto

from graphprune.errors import GraphpruneError

_BITS: dict[int, int] = {TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.FLOAT4E2M1: 4}
for _name in ("INT2", "UINT2"):
    if hasattr(TensorProto, _name):
        _BITS[getattr(TensorProto, _name)] = 2
_UNCHECKED: set[int] = {TensorProto.STRING, TensorProto.UNDEFINED}
for _name in ("FLOAT6E2M3", "FLOAT6E3M2"):
    if hasattr(TensorProto, _name):
        _UNCHECKED.add(getattr(TensorProto, _name))
# typed fields that hold exactly one entry per element (others pack or are not used for weights)
_FIELD_PER_ELEMENT: dict[int, str] = {
    TensorProto.FLOAT: "float_data",
    TensorProto.DOUBLE: "double_data",
    TensorProto.INT64: "int64_data",
    TensorProto.UINT64: "uint64_data",
    TensorProto.INT32: "int32_data",
    TensorProto.UINT32: "uint64_data",
    TensorProto.INT16: "int32_data",
    TensorProto.UINT16: "int32_data",
    TensorProto.INT8: "int32_data",
    TensorProto.UINT8: "int32_data",
    TensorProto.BOOL: "int32_data",
    TensorProto.FLOAT16: "int32_data",
    TensorProto.BFLOAT16: "int32_data",
}


def check_model_file(path: Path) -> None:
    """Parse the model at ``path`` without its external data and check its tensors (for commands that hand the
    file to another loader, such as ONNX Runtime, whose errors would not say what is wrong)."""
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError, RuntimeError) as exc:
        raise GraphpruneError(f"{path}: not a readable ONNX model ({str(exc).splitlines()[0]})") from None
    check_tensors(model, path)


def check_tensors(model: onnx.ModelProto, model_path: Path) -> bool:
    """Raise a one-line GraphpruneError for any tensor whose bytes cannot be its shape; return whether any
    tensor keeps its data in an external file. ``model`` is loaded without its external data."""
    external = False
    base = model_path.parent
    for where, tensor in stored_tensors(model):
        label = f"{model_path}: {where} {tensor.name!r}"
        dims = list(tensor.dims)
        if any(d < 0 for d in dims):
            raise GraphpruneError(f"{label} has a negative dimension {dims}: the file is corrupt")
        count = math.prod(dims)
        need = _byte_size(tensor.data_type, count)
        if tensor.data_location == TensorProto.EXTERNAL:
            external = True
            _check_external(tensor, label, base, need)
        elif need is not None:
            _check_inline(tensor, label, count, need)
    return external


def _byte_size(data_type: int, count: int) -> int | None:
    if data_type in _UNCHECKED:
        return None
    if data_type in _BITS:
        return (count * _BITS[data_type] + 7) // 8
    try:
        return count * onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None


def _check_inline(tensor: TensorProto, label: str, count: int, need: int) -> None:
    if tensor.HasField("raw_data"):
        have = len(tensor.raw_data)
        if have != need:
            word = "short" if have < need else "long"
            raise GraphpruneError(
                f"{label} has {have} bytes of data, its shape {list(tensor.dims)} needs {need}: the data is too "
                f"{word} (corrupt file)"
            )
        return
    field = _FIELD_PER_ELEMENT.get(tensor.data_type)
    if field is None:
        return
    have = len(getattr(tensor, field))
    if have != count and not (have == 0 and count == 0):
        raise GraphpruneError(
            f"{label} holds {have} values, its shape {list(tensor.dims)} needs {count} (corrupt file)"
        )


def _check_external(tensor: TensorProto, label: str, base: Path, need: int | None) -> None:
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    if not location:
        raise GraphpruneError(f"{label} is stored externally but names no data file")
    inside = _inside_directory(base, location)
    if not inside:
        # Say nothing about the outside file (whether it exists, its size): a model file is untrusted input.
        raise GraphpruneError(
            f"{label} points to external data outside the model's directory ({location!r}); graphprune reads "
            "external data only from files beside the model"
        )
    data_file = base / location
    if not data_file.is_file():
        raise GraphpruneError(f"{label}: its external data file {data_file} is missing")
    try:
        offset = int(info.get("offset") or 0)
        length = int(info["length"]) if info.get("length") else None
    except ValueError:
        raise GraphpruneError(f"{label} has a non-numeric external data offset or length") from None
    if offset < 0 or (length is not None and length < 0):
        raise GraphpruneError(f"{label} has a negative external data offset or length")
    if need is not None and length is not None and length != need:
        raise GraphpruneError(
            f"{label} has an external data length of {length} bytes, its shape {list(tensor.dims)} needs {need} "
            "(corrupt file)"
        )
    want = need if need is not None else (length or 0)
    have = data_file.stat().st_size - offset
    if have < want:
        raise GraphpruneError(
            f"{data_file}: external data of {label.split(': ', 1)[1]} needs {want} bytes at offset {offset}, "
            f"the file has {max(have, 0)}: missing, truncated or corrupt"
        )


def _inside_directory(base: Path, location: str) -> bool:
    """A relative location that stays in ``base``, also after resolving symbolic links."""
    if os.path.isabs(location) or Path(location).drive:
        return False
    try:
        real_base = base.resolve()
        return (base / location).resolve().is_relative_to(real_base)
    except (OSError, RuntimeError, ValueError):
        return False


def stored_tensors(model: onnx.ModelProto) -> Iterator[tuple[str, TensorProto]]:
    """Every stored tensor: initializers, sparse initializers, Constant and attribute tensors, subgraphs too."""
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for tensor in graph.initializer:
            yield "initializer", tensor
        for sparse in graph.sparse_initializer:
            yield "sparse initializer values", sparse.values
            yield "sparse initializer indices", sparse.indices
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    yield f"tensor of node {node.name or node.op_type}", attribute.t
                elif attribute.type == onnx.AttributeProto.TENSORS:
                    for t in attribute.tensors:
                        yield f"tensor of node {node.name or node.op_type}", t
                elif attribute.type == onnx.AttributeProto.GRAPH:
                    graphs.append(attribute.g)
                elif attribute.type == onnx.AttributeProto.GRAPHS:
                    graphs.extend(attribute.graphs)
