"""The library call behind ``graphprune convert``: an ONNX file to FP16 or BF16, written as every output is."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from graphprune.errors import GraphpruneError

if TYPE_CHECKING:
    from graphprune.passes.convert import ConvertResult
    from graphprune.tensorrt.eligibility import Eligibility

HalfType = Literal["float16", "bfloat16"]
_SUFFIX = {"float16": "fp16", "bfloat16": "bf16"}


@dataclass(frozen=True)
class ConvertFileResult:
    """Where the converted model went, what the conversion did, and each weight's sparse eligibility after it."""

    output: Path
    conversion: ConvertResult  # its ``model`` is the converted protobuf
    eligibility: list[Eligibility]


def default_convert_output(model: Path, dtype: HalfType) -> Path:
    """``<stem>.fp16.onnx`` or ``<stem>.bf16.onnx`` beside the input."""
    if model.name in ("", ".."):  # "" and "." are one Path: a directory, not a model file
        raise GraphpruneError(f"{str(model)!r} names no model file")
    return model.with_name(f"{model.stem}.{_SUFFIX[dtype]}.onnx")


def convert_file(
    model: str | Path,
    output: str | Path | None = None,
    *,
    dtype: HalfType = "float16",
    force: bool = False,
) -> ConvertFileResult:
    """Convert ``model`` to ``dtype`` computation (FP32 graph inputs and outputs) into ``output`` (default
    ``<stem>.fp16.onnx``/``<stem>.bf16.onnx``), keeping every pruned zero.

    Every output is checked before the work (``force`` replaces an existing file); a model with external data is
    written with external data. The input is never modified; nothing is written when anything fails.
    """
    import onnx_ir as ir

    from graphprune.artifacts import OutputPlan
    from graphprune.graph.model_io import load_model, to_proto, uses_external_data
    from graphprune.passes.convert import convert
    from graphprune.tensorrt.eligibility import eligibility_report

    if dtype not in _SUFFIX:
        raise GraphpruneError(f"unsupported `dtype` {dtype!r}: choose float16 or bfloat16")
    model = Path(model)
    output = Path(output) if output is not None else default_convert_output(model, dtype)
    outputs = OutputPlan(force=force)
    outputs.read(model, "the input model")
    outputs.model(output)
    outputs.check()
    loaded = load_model(model)
    external = uses_external_data(loaded)
    result = convert(to_proto(loaded), dtype)  # ONNX Runtime's converter works on protobufs
    del loaded
    converted = ir.from_proto(result.model)  # wraps the converted tensors, copies none
    records = eligibility_report(converted)
    with outputs.transaction() as files:
        files.model(output, converted, external_data=True if external else None)  # keep the input's layout
    return ConvertFileResult(output, result, records)
