"""Open an ONNX file as an onnx-ir model without reading its weights into Python.

Weights kept in external data files already are: onnx-ir reads them lazily. Weights stored *inside* the ``.onnx``
file (``raw_data``) would be read whole by protobuf; instead the file's protobuf wire format is walked once
(memory-mapped, only tags and lengths are read), the graph is parsed without those bytes, and every inline weight
becomes an external tensor that points at its own bytes inside the model file. ONNX Runtime then reads the weights
from the file itself, and the calibration process never holds a second copy of them.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from graphprune.errors import GraphpruneError

_MODEL_GRAPH = 7  # ModelProto.graph
_GRAPH_INITIALIZER = 5  # GraphProto.initializer
_TENSOR_RAW_DATA = 9  # TensorProto.raw_data
_LENGTH_DELIMITED = 2
_INLINE_BYTES = 1024  # smaller tensors stay inline: shape inference reads constant shapes and axes


def open_model(path: str | Path) -> ir.Model:
    """The model at ``path`` with every weight left on disk, or a one-line GraphpruneError."""
    path = Path(path)
    if not path.is_file():
        raise GraphpruneError(f"model not found: {path}")
    try:
        with path.open("rb") as stream, mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as data:
            skeleton, raw = _without_raw_data(data)  # indexing an mmap copies only what is read
        proto = onnx.ModelProto.FromString(skeleton)
    except (DecodeError, ValueError, IndexError) as exc:
        raise GraphpruneError(f"cannot read ONNX model {path}: {str(exc).splitlines()[0] or 'corrupt'}") from None
    if not proto.HasField("graph") or not proto.opset_import:
        raise GraphpruneError(f"cannot read ONNX model {path}: no graph or opset (not an ONNX model?)")
    for index, (offset, length) in raw.items():
        tensor = proto.graph.initializer[index]
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", path.name), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, path.parent)
    return model


def _varint(data: mmap.mmap | bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _fields(data: mmap.mmap | bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, start of the field, start of its payload, end of the field) of a message."""
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(data, pos)
            payload = field_start
        elif wire == 1:
            payload, pos = pos, pos + 8
        elif wire == _LENGTH_DELIMITED:
            size, payload = _varint(data, pos)
            pos = payload + size
        elif wire == 5:
            payload, pos = pos, pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > end:
            raise ValueError("truncated protobuf message")
        yield number, wire, field_start, payload, pos


def _message(number: int, body: bytes) -> bytes:
    return _encode_varint(number << 3 | _LENGTH_DELIMITED) + _encode_varint(len(body)) + body


def _without_raw_data(data: mmap.mmap | bytes) -> tuple[bytes, dict[int, tuple[int, int]]]:
    """The model's bytes with the initializers' raw_data left out, and (file offset, length) per initializer."""
    raw: dict[int, tuple[int, int]] = {}
    parts: list[bytes] = []
    index = 0  # of the initializer, across the graph field's occurrences (protobuf merges them)
    for number, wire, start, payload, end in _fields(data, 0, len(data)):
        if number != _MODEL_GRAPH or wire != _LENGTH_DELIMITED:
            parts.append(data[start:end])
            continue
        graph: list[bytes] = []
        for g_number, g_wire, g_start, g_payload, g_end in _fields(data, payload, end):
            if g_number != _GRAPH_INITIALIZER or g_wire != _LENGTH_DELIMITED:
                graph.append(data[g_start:g_end])
                continue
            tensor: list[bytes] = []
            for t_number, t_wire, t_start, t_payload, t_end in _fields(data, g_payload, g_end):
                if (
                    t_number == _TENSOR_RAW_DATA
                    and t_wire == _LENGTH_DELIMITED
                    and t_end - t_payload > _INLINE_BYTES
                ):
                    raw[index] = (t_payload, t_end - t_payload)
                else:
                    tensor.append(data[t_start:t_end])
            graph.append(_message(_GRAPH_INITIALIZER, b"".join(tensor)))
            index += 1
        parts.append(_message(_MODEL_GRAPH, b"".join(graph)))
    return b"".join(parts), raw
