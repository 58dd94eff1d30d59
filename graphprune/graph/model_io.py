"""Load and save ONNX models as onnx-ir models: external data read lazily, IR version kept, one-line errors."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from graphprune.errors import GraphpruneError
from graphprune.model_checks import check_tensors

# Protobuf cannot serialise a message of 2 GiB or more; stay well below it.
_INLINE_LIMIT = 1 << 30
# Tensors at least this large go to the data file when a model is saved with external data (as onnx's default).
EXTERNAL_THRESHOLD = 1024
_WRITERS = 2
_IN_FLIGHT = 1 << 27  # bytes of materialised tensors held at once while writing (plus the largest one)


def load_model(path: str | Path) -> ir.Model:
    """Load an ONNX model, its external tensors mapped lazily from their files, or raise a one-line error.

    This is ``ir.load`` with two checks first, on the graph proto alone: initializer names are unique (onnx-ir
    would silently keep the last copy, ONNX Runtime another one) and every external tensor fits in its file.
    """
    path = Path(path)
    if not path.exists():
        raise GraphpruneError(f"{path}: no such file")
    if not path.is_file():
        raise GraphpruneError(f"{path}: not a file")
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
        if not proto.HasField("graph") or proto.ir_version <= 0 or not proto.opset_import:
            raise GraphpruneError(f"{path}: not an ONNX model (no graph, IR version or opset)")
        _refuse_duplicate_initializers(proto.graph, path)
        check_tensors(proto, path)  # bytes that cannot be their shape, external data outside: one line
        model = ir.serde.deserialize_model(proto)
    except (DecodeError, RuntimeError, ValueError, TypeError) as exc:
        raise GraphpruneError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from None
    except OSError as exc:
        reason = exc.strerror or exc
        raise GraphpruneError(f"{path}: cannot read the model or its external data ({reason})") from None
    ir.external_data.set_base_dir(model.graph, path.parent)
    return model


def save_model(model: ir.Model, path: str | Path, external_data: bool | None = None) -> None:
    """Write ``model`` atomically: to a temporary name beside ``path``, then renamed into place.

    ``external_data=None`` keeps weights inline unless they would not fit in one protobuf, in which case they
    go to ``<name>.data`` beside the model. IR version, opset imports, functions and metadata are kept as is.
    Tensors are written one at a time (lazy tensors are evaluated as they are written).
    """
    path = Path(path)
    if external_data is None:
        external_data = weight_bytes(model) >= _INLINE_LIMIT
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        staged = staging / path.name
        data_name = f"{path.name}.data"
        try:
            if external_data:
                ir.save(
                    model,
                    staged,
                    external_data=data_name,
                    size_threshold_bytes=EXTERNAL_THRESHOLD - 1,
                    # Two writers overlap one tensor's pruning (lazy tensors, numpy releases the GIL) with the
                    # next one's, and the disk writes; the bytes in flight stay bounded, the layout is the same.
                    max_workers=_WRITERS,
                    max_in_flight_bytes=_IN_FLIGHT,
                )
            else:
                ir.save(model, staged)
        except ValueError as exc:  # e.g. a tensor whose bytes do not match its shape
            raise GraphpruneError(f"cannot write {path}: {_first_line(exc)}") from None
        if external_data:
            # The data file lands first: a model file never points at data that is not there yet.
            os.replace(staging / data_name, path.parent / data_name)
        os.replace(staged, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def uses_external_data(model: ir.Model) -> bool:
    """Whether any initializer of the model is stored in an external file."""
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in _initializers(model))


def weight_bytes(model: ir.Model) -> int:
    """Bytes of initializer data (in memory or in external files)."""
    return sum(v.const_value.nbytes for v in _initializers(model) if v.const_value is not None)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """The model as one protobuf with every tensor's bytes inside, for tools that need bytes (ONNX Runtime)."""
    proto = ir.to_proto(model)
    bases = {
        str(v.const_value.base_dir) for v in _initializers(model) if isinstance(v.const_value, ir.ExternalTensor)
    }
    for base in bases:
        onnx.external_data_helper.load_external_data_for_model(proto, base)
    return proto


def _initializers(model: ir.Model) -> Iterator[ir.Value]:
    for graph in model.graphs():
        yield from graph.initializers.values()


def default_output(model_path: Path) -> Path:
    """``<stem>.pruned.onnx`` beside the input."""
    if model_path.name in ("", ".."):  # "" and "." are one Path: a directory, not a model file
        raise GraphpruneError(f"{str(model_path)!r} names no model file")
    return model_path.with_name(f"{model_path.stem}.pruned.onnx")


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _graphs(sub)


def _refuse_duplicate_initializers(graph: onnx.GraphProto, path: Path) -> None:
    """Two initializers of one name: tools disagree on which one counts (the ONNX checker calls it invalid)."""
    for sub in _graphs(graph):
        seen: set[str] = set()
        for init in sub.initializer:
            if init.name in seen:
                raise GraphpruneError(
                    f"{path}: invalid model, initializer {init.name!r} is defined twice"
                    f"{'' if sub is graph else f' in subgraph {sub.name!r}'}"
                )
            seen.add(init.name)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
