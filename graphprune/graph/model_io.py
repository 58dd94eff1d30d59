"""Load and save ONNX models: external data, IR version kept, atomic writes, one-line errors."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from graphprune.errors import GraphpruneError

# Protobuf cannot serialise a message of 2 GiB or more; stay well below it.
_INLINE_LIMIT = 1 << 30


def load_model(path: str | Path) -> onnx.ModelProto:
    """Load an ONNX model with its external data, or raise a one-line GraphpruneError."""
    return load_model_and_layout(path)[0]


def load_model_and_layout(path: str | Path) -> tuple[onnx.ModelProto, bool]:
    """The model with its external data loaded, and whether it kept any tensor in external files."""
    path = Path(path)
    if not path.exists():
        raise GraphpruneError(f"{path}: no such file")
    if not path.is_file():
        raise GraphpruneError(f"{path}: not a file")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
        if not model.HasField("graph") or model.ir_version <= 0 or not model.opset_import:
            raise GraphpruneError(f"{path}: not an ONNX model (no graph, IR version or opset)")
        external = _check_external_sizes(model, path.parent)
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    except (DecodeError, RuntimeError, ValueError, TypeError) as exc:
        raise GraphpruneError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from None
    except OSError as exc:
        reason = exc.strerror or exc
        raise GraphpruneError(f"{path}: cannot read the model or its external data ({reason})") from None
    return model, external


def save_model(model: onnx.ModelProto, path: str | Path, external_data: bool | None = None) -> None:
    """Write ``model`` atomically: to a temporary name beside ``path``, then renamed into place.

    ``external_data=None`` keeps weights inline unless they would not fit in one protobuf, in which case they
    go to ``<name>.data`` beside the model. IR version, opset imports, functions and metadata are kept as is.
    """
    path = Path(path)
    if external_data is None:
        external_data = weight_bytes(model) >= _INLINE_LIMIT
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        staged = staging / path.name
        data_name = f"{path.name}.data"
        if external_data:
            onnx.save_model(
                model,
                str(staged),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
            # The data file lands first: a model file never points at data that is not there yet.
            os.replace(staging / data_name, path.parent / data_name)
        else:
            onnx.save_model(model, str(staged))
        os.replace(staged, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of initializer data held in memory."""
    return sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)


def default_output(model_path: Path) -> Path:
    """``<stem>.pruned.onnx`` beside the input."""
    return model_path.with_name(f"{model_path.stem}.pruned.onnx")


def check_output_path(model_path: Path, output: Path, force: bool) -> None:
    """Refuse an output that is the input, or that exists without ``force``."""
    with contextlib.suppress(OSError):
        if output.resolve() == model_path.resolve():
            raise GraphpruneError(f"output {output} is the input model; choose another path with -o")
    if output.exists() and not force:
        raise GraphpruneError(f"{output} exists; pass --force to overwrite it")


def _check_external_sizes(model: onnx.ModelProto, base_dir: Path) -> bool:
    """A truncated data file still loads (short reads): check every external tensor fits in its file.

    Returns whether any tensor is external.

    Inline tensors need no check: protobuf refuses a message whose length-delimited fields are cut short.
    """
    external = False
    constants = [a.t for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
    for tensor in [*model.graph.initializer, *constants]:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        external = True
        info = {entry.key: entry.value for entry in tensor.external_data}
        count = 1
        for dim in tensor.dims:
            count *= dim
        need = int(info.get("length") or count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize)
        data_file = base_dir / info.get("location", "")
        have = data_file.stat().st_size - int(info.get("offset") or 0) if data_file.is_file() else -1
        if have < need:
            raise GraphpruneError(
                f"{data_file}: external data of tensor {tensor.name} needs {need} bytes, the file has "
                f"{max(have, 0)}: missing, truncated or corrupt"
            )
    return external


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
