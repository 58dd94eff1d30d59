"""Build a TensorRT or TensorRT-RTX engine with sparse weights from a pruned ONNX model; report what it said.

Small steps, each doing one thing (the shape of Polygraphy's ``NetworkFromOnnxPath`` -> ``CreateConfig`` ->
``EngineBytesFromNetwork`` loaders): :func:`read_onnx` and the profile checks run on the ONNX file alone;
:func:`parse_network`, :func:`create_config` and :func:`serialize` drive the backend's Builder and OnnxParser;
:func:`engine_header_problems` asks the runtime about the result without a GPU; :func:`build_engine` strings them
together and commits the engine and its ``<engine>.json`` together.

Why not Polygraphy's loaders themselves: Polygraphy (0.53) picks TensorRT-RTX through a process-wide environment
variable read when it is imported (``POLYGRAPHY_USE_TENSORRT_RTX``) and then imports the module ``tensorrt_rtx``,
which PyPI's standalone wheels do not provide (they install ``tensorrt_rtx_bindings``); it logs to stdout through a
global logger (graphprune's library prints nothing), and its errors are multi-line exceptions. The calls below are
the handful it would make.

Precision: TensorRT 10 takes builder flags (``FP16``, ``BF16``, ``INT8``) for an FP32 network; TensorRT 11 and
TensorRT-RTX are strongly typed, so the ONNX file's own types decide, and an FP32 file builds an FP32 engine
(with a warning: sparse tensor cores need FP16, BF16 or INT8; ``graphprune convert --fp16`` first).
"""

from __future__ import annotations

import ctypes
import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import onnx
from google.protobuf.message import DecodeError

from graphprune.errors import GraphpruneError
from graphprune.model_checks import check_tensors
from graphprune.tensorrt.backends import Backend, LoadedBackend, load_backend
from graphprune.tensorrt.layer_precision import precision_note, with_precisions
from graphprune.tensorrt.logs import (
    capturing_logger,
    parse_builder_io,
    parse_builder_layers,
    parse_inspector_json,
    parse_sparsity_log,
    sparsity_mentions,
)
from graphprune.tensorrt.outputs import plan_outputs
from graphprune.tensorrt.parsable import check_parsable
from graphprune.tensorrt.profiles import ShapeRange, check_profiles, model_inputs, parse_shapes
from graphprune.tensorrt.report import BuildReport, Sparsity, report_path, sparsity_verdict

PRECISIONS = ("fp16", "bf16", "int8-qdq")
_FLAGS_TRT10 = {"fp16": ("FP16",), "bf16": ("BF16",), "int8-qdq": ("INT8", "FP16")}
_DEFERRED_RE = re.compile(r"Compiler backend is used during engine execution")
# Runtime diagnostics about the engine file itself; the others (driver, GPU, memory) are about this machine.
_HEADER_PROBLEMS = ("MALFORMED_ENGINE", "VERSION_MISMATCH")


# --- the ONNX file ----------------------------------------------------------------------------------------------


def read_onnx(path: Path) -> onnx.ModelProto:
    """The model's graph without external weights (the parser reads those itself), or a one-line error."""
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except FileNotFoundError:
        raise GraphpruneError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise GraphpruneError(f"{path}: a directory, not an ONNX file") from None
    except OSError as exc:
        raise GraphpruneError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except (DecodeError, RuntimeError, ValueError, TypeError) as exc:
        reason = _one_line(str(exc)) or type(exc).__name__
        raise GraphpruneError(f"{path}: not an ONNX model ({reason})") from None
    if not model.HasField("graph") or model.ir_version <= 0 or not model.opset_import or not model.graph.node:
        raise GraphpruneError(f"{path}: not an ONNX model (no graph, IR version or opset)")
    return model


def onnx_precision(model: onnx.ModelProto) -> str:
    """The math precision an ONNX file asks for by itself: int8-qdq, fp8-qdq, fp16, bf16 or fp32."""
    ops = {n.op_type for n in model.graph.node}
    if {"QuantizeLinear", "DequantizeLinear"} <= ops:
        fp8 = {onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E5M2}
        zero_points = {n.input[2] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2}
        types = {t.data_type for t in model.graph.initializer if t.name in zero_points}
        return "fp8-qdq" if types and types <= fp8 else "int8-qdq"
    types = {t.data_type for t in model.graph.initializer}
    types |= {
        a.t.data_type
        for n in model.graph.node
        if n.op_type == "Constant"
        for a in n.attribute
        if a.name == "value"
    }
    if onnx.TensorProto.FLOAT16 in types:
        return "fp16"
    if onnx.TensorProto.BFLOAT16 in types:
        return "bf16"
    return "fp32"


# --- the plan ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class BuildPlan:
    """How the network and builder config are set up for one backend and version."""

    strongly_typed: bool
    flags: tuple[str, ...]  # BuilderFlag member names
    precision: str  # what the engine computes in
    note: str
    warnings: tuple[str, ...] = ()


def plan_build(
    backend: Backend,
    version: str,
    precision: str | None,
    sparse: bool,
    model_precision: str,
    model_name: str = "MODEL",
) -> BuildPlan:
    """Network typing and builder flags, or a one-line error.

    ``precision=None`` means: what the file says, and for an FP32 file FP16 where builder flags exist.
    """
    if precision is not None and precision not in PRECISIONS:
        raise GraphpruneError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if not backend.always_strongly_typed and _major(version) < 10:
        raise GraphpruneError(f"TensorRT {version} is too old: graphprune builds with TensorRT 10 or 11")
    if model_precision != "fp32" and precision not in (None, model_precision):
        raise GraphpruneError(
            f"the ONNX file is already {model_precision.upper()} but `precision` is {precision}: "
            f"use `precision={model_precision}`"
        )
    sparse_flags = ("SPARSE_WEIGHTS",) if sparse else ()
    if model_precision != "fp32":
        return BuildPlan(
            strongly_typed=True,
            flags=sparse_flags,
            precision=model_precision,
            note=f"strongly typed: {model_precision} from the ONNX file",
        )
    strongly_typed = backend.always_strongly_typed or _major(version) >= 11
    if strongly_typed:
        warnings: tuple[str, ...] = ()
        if sparse:
            dtype = "BF16" if precision == "bf16" else "FP16"
            warnings = (
                f"{model_name} is FP32, and {backend.product} {version} takes precision from the file, so the "
                f"engine computes in FP32; sparse tensor cores need FP16, BF16 or INT8: convert {model_name} to "
                f"{dtype} first (`graphprune convert` or graphprune.convert_file) and build that",
            )
        return BuildPlan(
            strongly_typed=True,
            flags=sparse_flags,
            precision="fp32",
            note="strongly typed: fp32 from the ONNX file",
            warnings=warnings,
        )
    wanted = precision or "fp16"
    note = f"weakly typed with builder flags {', '.join(_FLAGS_TRT10[wanted])} (TensorRT 10)"
    return BuildPlan(strongly_typed=False, flags=_FLAGS_TRT10[wanted] + sparse_flags, precision=wanted, note=note)


def _major(version: str) -> int:
    match = re.match(r"(\d+)", version)
    return int(match.group(1)) if match else 0


# --- GPU (full TensorRT builds on the GPU it targets) ------------------------------------------------------------


def cuda_compute_capability(device: int = 0) -> tuple[str, tuple[int, int]]:
    """Name and compute capability of a GPU through the CUDA driver (libcuda), or a one-line error."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1" if os.name != "nt" else "nvcuda.dll")
    except OSError:
        raise GraphpruneError(
            "no CUDA driver found (libcuda): TensorRT needs an NVIDIA GPU and its driver; "
            "`backend=tensorrt-rtx` builds without one"
        ) from None
    if cuda.cuInit(0) != 0:
        raise GraphpruneError("the CUDA driver found no usable GPU (cuInit failed)")
    count = ctypes.c_int()
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value <= device:
        raise GraphpruneError(f"CUDA sees {count.value} GPU(s): no GPU {device} to build for")
    handle, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    cuda.cuDeviceGet(ctypes.byref(handle), device)
    cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, handle)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, handle)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR
    name = ctypes.create_string_buffer(256)
    cuda.cuDeviceGetName(name, 256, handle)
    return name.value.decode(errors="replace"), (major.value, minor.value)


def has_cuda_gpu() -> bool:
    try:
        cuda_compute_capability()
    except GraphpruneError:
        return False
    return True


def check_sparse_gpu(name: str, capability: tuple[int, int]) -> None:
    """Sparse tensor cores exist from compute capability 8.0 (Ampere; Orin on Jetson) on."""
    if capability < (8, 0):
        raise GraphpruneError(
            f"{name} has compute capability {capability[0]}.{capability[1]}: sparse tensor cores need 8.0 or "
            "newer (Ampere, Ada, Hopper, Blackwell; Orin on Jetson); build with `sparse=False`"
        )


def target_gpu(backend: Backend, sparse: bool) -> str:
    """The GPU the build runs on, checked for sparse tensor cores; none for an ahead-of-time build."""
    if backend.builds_without_gpu:
        return f"none used: {backend.product} builds ahead of time and finishes kernels on the GPU that loads it"
    name, capability = cuda_compute_capability()
    if sparse:
        check_sparse_gpu(name, capability)
    return f"{name} (sm_{capability[0]}{capability[1]})"


# --- the steps on the backend -----------------------------------------------------------------------------------


def parse_network(loaded: LoadedBackend, builder: Any, onnx_path: Path, strongly_typed: bool) -> tuple[Any, Any]:
    """The backend's ONNX parser over ``onnx_path``: (network, parser), or the parser's first error on one line."""
    trt = loaded.trt
    flags = 0
    if strongly_typed:
        flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        flags = 0 if flag is None else 1 << int(flag)  # TensorRT 11: always strongly typed, the flag may be gone
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, builder.logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        if not errors:
            raise GraphpruneError(f"{loaded.label} could not parse {onnx_path}")
        first = errors[0]
        where = f" at node {first.node_name()!r} ({first.node_operator()})" if first.node_name() else ""
        raise GraphpruneError(f"{loaded.label} could not parse {onnx_path}{where}: {_one_line(first.desc())}")
    return network, parser


def create_config(
    loaded: LoadedBackend,
    builder: Any,
    flags: Sequence[str],
    ranges: dict[str, ShapeRange],
    workspace_gb: float | None = None,
    timing_cache: bytes | None = None,
) -> Any:
    """A builder config with ``flags``, one optimisation profile from ``ranges``, detailed profiling verbosity
    (so the builder and the inspector name each layer's tactic), a workspace limit and a timing cache."""
    trt = loaded.trt
    config = builder.create_builder_config()
    for flag in flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if workspace_gb is not None:
        if workspace_gb <= 0:
            raise GraphpruneError(f"`workspace_gb` must be positive, got {workspace_gb}")
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if ranges:
        profile = builder.create_optimization_profile()
        for r in ranges.values():
            profile.set_shape(r.name, r.min, r.opt, r.max)
        config.add_optimization_profile(profile)
    if timing_cache is not None:
        config.set_timing_cache(config.create_timing_cache(timing_cache), ignore_mismatch=False)
    return config


def serialize(loaded: LoadedBackend, builder: Any, network: Any, config: Any, logger: Any) -> bytes:
    """The serialized engine, or the builder's last error on one line."""
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        errors = [line.text for line in logger.lines if line.severity == "E"]
        raise GraphpruneError(
            f"{loaded.label} failed to build the engine: {_one_line(errors[-1]) if errors else 'no error logged'}"
        )
    return bytes(serialized)


def engine_header_problems(loaded: LoadedBackend, logger: Any, engine: bytes) -> list[str] | None:
    """Problems the runtime finds in the engine's header without a GPU (malformed, version mismatch), or ``None``
    when this runtime cannot check (no ``get_engine_validity``)."""
    trt = loaded.trt
    runtime = trt.Runtime(logger)
    if not hasattr(runtime, "get_engine_validity"):
        return None
    _, diagnostics = runtime.get_engine_validity(engine[: runtime.engine_header_size])
    members = trt.EngineInvalidityDiagnostics.__members__
    return [name for name in _HEADER_PROBLEMS if name in members and int(diagnostics) & int(members[name])]


def inspect_engine(loaded: LoadedBackend, logger: Any, engine: bytes) -> list[Any] | None:
    """Per-layer tactics from the engine inspector (the engine is deserialised, so a GPU is needed), or ``None``
    when the runtime cannot load it here."""
    trt = loaded.trt
    loaded_engine = trt.Runtime(logger).deserialize_cuda_engine(engine)
    if loaded_engine is None:
        return None
    inspector = loaded_engine.create_engine_inspector()
    return parse_inspector_json(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# --- the whole build ---------------------------------------------------------------------------------------------


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    precision: str | None = None,
    sparse: bool = True,
    shapes: Sequence[str] = (),
    timing_cache: str | Path | None = None,
    workspace_gb: float | None = None,
    backend: str | None = None,
    force: bool = False,
) -> BuildReport:
    """Build ``engine_path`` from ``onnx_path`` and save the report beside it (``<engine>.json``).

    Everything that can be checked before the build is (the ONNX file and its tensors, the profiles, every output:
    the engine and ``<engine>.json`` are refused when they exist unless ``force``); the engine, its report and the
    timing cache are written together at the end, or not at all.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    loaded = load_backend(backend)
    cache_path = Path(timing_cache) if timing_cache else None
    outputs = plan_outputs(onnx_path, engine_path, cache_path, force)  # a clash is refused even if unused
    notes = []
    if cache_path is not None and not loaded.backend.timing_cache:
        notes.append(
            f"{loaded.backend.product} has no timing cache (its cache calls are no-ops): {cache_path} ignored"
        )
        cache_path = None
    model = read_onnx(onnx_path)
    check_tensors(model, onnx_path)  # corrupt tensors in one line, before the backend's parser meets them
    check_parsable(model, onnx_path.name)
    ranges = parse_shapes(shapes)
    check_profiles(model_inputs(model), ranges)
    plan = plan_build(loaded.backend, loaded.version, precision, sparse, onnx_precision(model), onnx_path.name)
    gpu = target_gpu(loaded.backend, sparse)

    trt = loaded.trt
    logger = capturing_logger(trt)
    builder = trt.Builder(logger)
    network, _parser = parse_network(loaded, builder, onnx_path, plan.strongly_typed)
    cache_in = None if cache_path is None else cache_path.read_bytes() if cache_path.is_file() else b""
    config = create_config(loaded, builder, plan.flags, ranges, workspace_gb, cache_in)
    start = time.perf_counter()
    engine = serialize(loaded, builder, network, config, logger)
    seconds = time.perf_counter() - start

    problems = engine_header_problems(loaded, logger, engine)
    if problems:
        raise GraphpruneError(f"the runtime rejects the header of the engine {loaded.label} built: {problems[0]}")
    report = BuildReport(
        onnx=str(onnx_path),
        engine=str(engine_path),
        engine_bytes=len(engine),
        backend=loaded.backend.name,
        product=loaded.backend.product,
        version=loaded.version,
        gpu=gpu,
        precision=plan.precision,
        strongly_typed=plan.strongly_typed,
        flags=list(plan.flags),
        profiles=[{name: r.as_dict() for name, r in ranges.items()}] if ranges else [],
        build_seconds=round(seconds, 2),
        parser={"onnx_nodes": len(model.graph.node), "network_layers": network.num_layers},
        header_check=_header_note(problems),
        warnings=[*plan.warnings, *notes],
        note=plan.note,
        **_what_the_build_said(loaded, logger, engine, sparse, model),
    )
    with outputs.transaction() as files:
        files.bytes(engine_path, engine, "engine")
        files.bytes(report_path(engine_path), report.to_json().encode(), "engine report")
        if cache_path is not None:
            files.bytes(cache_path, bytes(config.get_timing_cache().serialize()), "timing cache")
    return report


def _what_the_build_said(
    loaded: LoadedBackend, logger: Any, engine: bytes, sparse: bool, model: onnx.ModelProto
) -> dict[str, Any]:
    """The report's sparsity facts, layers (each with the precision its ONNX origin shows), engine I/O and
    builder warnings: from the builder's log, or from the engine inspector where the engine loads on this
    machine's GPU."""
    layers, source = parse_builder_layers(logger.lines), "builder log"
    if has_cuda_gpu():
        inspected = inspect_engine(loaded, logger, engine)
        if inspected is not None:
            layers, source = inspected, "engine inspector"
    source = source if layers else ""
    layers = with_precisions(model, layers)
    log = parse_sparsity_log(line.text for line in logger.lines)
    deferred = next((line.text for line in logger.lines if _DEFERRED_RE.search(line.text)), None)
    sparsity = Sparsity(
        flag=sparse,
        lines=sparsity_mentions(logger.lines),
        eligible_layers=list(log.eligible),
        sparse_layers=list(log.picked),
        sparse_tactic_layers=[layer.name for layer in layers if layer.sparse_tactic],
        verdict=sparsity_verdict(loaded.backend.product, sparse, log, layers, source, deferred),
    )
    return {
        "sparsity": sparsity,
        "layers_source": source,
        "layers": [asdict(layer) for layer in layers],
        "layer_precision_note": precision_note(loaded.backend.product, loaded.backend.builds_without_gpu)
        if layers
        else "",
        "engine_io": [asdict(tensor) for tensor in parse_builder_io(logger.lines)],
        "builder_warnings": [line.text for line in logger.lines if line.severity == "W"],
    }


def _header_note(problems: list[str] | None) -> str:
    if problems is None:
        return "not checked: this runtime has no get_engine_validity"
    return "well-formed: the runtime's get_engine_validity finds no malformed header or version mismatch"
