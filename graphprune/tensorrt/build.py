"""Build a TensorRT engine from a pruned ONNX model with sparse weights, and report which layers really ran sparse.

The only module of graphprune that imports ``tensorrt`` (lazily, inside :func:`build_engine` and
:func:`time_engine`). Written against TensorRT's documented Python API for 10.x and 11.x:

* TensorRT 10: precision by builder flags (``FP16``, ``BF16``, ``INT8`` for Q/DQ models), weakly typed network,
  when the ONNX is FP32; an ONNX already in the requested half precision is built strongly typed.
* TensorRT 11: networks are always strongly typed and the precision flags are gone: the precision comes from the
  ONNX file itself, so an FP32 file must be converted first (``graphprune convert --fp16``).
* Both: ``BuilderFlag.SPARSE_WEIGHTS``, one optimisation profile from ``NAME:MIN,OPT,MAX`` shapes, a timing cache
  loaded and saved, the workspace memory-pool limit, detailed profiling verbosity for the engine inspector.

The sparsity facts come from two places, both parsed by pure functions tested without TensorRT: the builder log
("(Sparsity) Layers eligible for sparse math: ..." and "(Sparsity) TRT inference plan picked sparse implementation
for layers: ...") and the engine inspector's JSON, whose tactic names tell sparse kernels apart.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx

from graphprune.errors import GraphpruneError

PRECISIONS = ("fp16", "bf16", "int8-qdq")
_FLAGS_TRT10 = {"fp16": ("FP16",), "bf16": ("BF16",), "int8-qdq": ("INT8", "FP16")}
_ELIGIBLE_RE = re.compile(r"\(Sparsity\)\s*Layers eligible for sparse math:\s*(.*)$")
_PICKED_RE = re.compile(r"\(Sparsity\)\s*TRT inference plan picked sparse implementation for layers:\s*(.*)$")
_DIMS_RE = re.compile(r"^\d+(x\d+)*$")


# --- options --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeRange:
    """One dynamic input's optimisation-profile shapes."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def parse_shapes(specs: Iterable[str]) -> dict[str, ShapeRange]:
    """``["input_ids:1x16,8x128,32x512"]`` -> ``{"input_ids": ShapeRange(...)}``, one-line errors otherwise.

    The name is everything before the last ``:`` (ONNX names may contain colons); dims are joined by ``x``.
    """
    ranges: dict[str, ShapeRange] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        parts = dims.replace(" ", "").split(",")
        if not sep or not name or len(parts) != 3 or not all(_DIMS_RE.match(p) for p in parts):
            raise GraphpruneError(
                f"invalid --shapes {spec!r}: expected NAME:MIN,OPT,MAX, e.g. input_ids:1x16,8x128,32x512"
            )
        lo, opt, hi = (tuple(int(d) for d in p.split("x")) for p in parts)
        if not (len(lo) == len(opt) == len(hi)):
            raise GraphpruneError(f"invalid --shapes {spec!r}: MIN, OPT and MAX need the same rank")
        if not all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)):
            raise GraphpruneError(f"invalid --shapes {spec!r}: need MIN <= OPT <= MAX in every dimension")
        if name in ranges:
            raise GraphpruneError(f"--shapes gives {name!r} twice")
        ranges[name] = ShapeRange(name, lo, opt, hi)
    return ranges


def onnx_precision(model: onnx.ModelProto) -> str:
    """The math precision an ONNX file asks for by itself: ``int8-qdq``, ``fp16``, ``bf16`` or ``fp32``."""
    ops = {n.op_type for n in model.graph.node}
    if {"QuantizeLinear", "DequantizeLinear"} <= ops:
        return "int8-qdq"
    types = {t.data_type for t in model.graph.initializer}
    if onnx.TensorProto.FLOAT16 in types:
        return "fp16"
    if onnx.TensorProto.BFLOAT16 in types:
        return "bf16"
    return "fp32"


@dataclass(frozen=True)
class BuildPlan:
    """How the network and builder config are set up for one TensorRT version."""

    strongly_typed: bool
    flags: tuple[str, ...]  # BuilderFlag member names
    note: str


def plan_build(trt_version: str, precision: str, sparse: bool, model_precision: str) -> BuildPlan:
    """Network typing and builder flags for ``precision`` on TensorRT ``trt_version``, or a one-line error."""
    if precision not in PRECISIONS:
        raise GraphpruneError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    major = _major(trt_version)
    if major < 10:
        raise GraphpruneError(f"TensorRT {trt_version} is too old: graphprune builds with TensorRT 10 or 11")
    if model_precision not in ("fp32", precision):
        raise GraphpruneError(
            f"the ONNX file is already {model_precision.upper()} but --precision is {precision}: "
            f"use --precision {model_precision}"
        )
    sparse_flags = ("SPARSE_WEIGHTS",) if sparse else ()
    if model_precision == precision:
        note = f"strongly typed: precision {precision} comes from the ONNX file"
        return BuildPlan(True, sparse_flags, note)
    if major >= 11:
        flag = "--bf16" if precision == "bf16" else "--fp16"
        if precision == "int8-qdq":
            raise GraphpruneError(
                "TensorRT 11 builds strongly typed networks: int8-qdq needs an ONNX with Q/DQ nodes, "
                "this one has none"
            )
        raise GraphpruneError(
            f"TensorRT {trt_version} builds strongly typed networks, so the precision comes from the ONNX file, "
            f"which is FP32: run `graphprune convert MODEL {flag} -o model.{precision}.onnx` and build that"
        )
    note = f"weakly typed with builder flags {', '.join(_FLAGS_TRT10[precision])} (TensorRT 10)"
    return BuildPlan(False, _FLAGS_TRT10[precision] + sparse_flags, note)


def _major(version: str) -> int:
    match = re.match(r"(\d+)", version)
    return int(match.group(1)) if match else 0


# --- what the build says ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SparsityLog:
    """The two sparsity lines of a TensorRT build log."""

    eligible: tuple[str, ...]  # layers whose weights TensorRT found 2:4 structured
    picked: tuple[str, ...]  # layers for which the engine uses a sparse implementation
    seen: bool  # whether the log had the lines at all (absent when SPARSE_WEIGHTS was off)


def parse_sparsity_log(lines: Iterable[str]) -> SparsityLog:
    """Extract the "(Sparsity)" lines, with or without trtexec's ``[date] [I] [TRT]`` prefix.

    Layer names are separated by ", "; fused layers ("a + b") stay one name. Later lines replace earlier ones
    (a build with several profiles or retries logs them again).
    """
    eligible: tuple[str, ...] = ()
    picked: tuple[str, ...] = ()
    seen = False
    for line in lines:
        line = line.rstrip()
        if match := _ELIGIBLE_RE.search(line):
            eligible, seen = _layer_list(match.group(1)), True
        elif match := _PICKED_RE.search(line):
            picked, seen = _layer_list(match.group(1)), True
    return SparsityLog(eligible, picked, seen)


def _layer_list(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(", ") if name.strip())


@dataclass(frozen=True)
class LayerInfo:
    """One engine layer as the engine inspector describes it (detailed profiling verbosity)."""

    name: str
    layer_type: str
    tactic: str
    sparse: bool  # the tactic is a sparse kernel (its name says "sparse")
    origin: str  # ONNX node(s) it came from, from the Metadata field when present


def parse_inspector_json(text: str) -> list[LayerInfo]:
    """Layers of ``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)``.

    With LAYER_NAMES_ONLY verbosity the layers are bare strings (no tactic: never reported sparse). The I/O tensor
    section (``Bindings`` in 10.x, ``I/O Tensors`` in 11.x) is not needed here.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GraphpruneError(f"engine inspector output is not JSON ({exc.msg})") from None
    layers = []
    for entry in data.get("Layers", []):
        if isinstance(entry, str):
            layers.append(LayerInfo(entry, "", "", False, ""))
            continue
        tactic = str(entry.get("TacticName", ""))
        layers.append(
            LayerInfo(
                name=str(entry.get("Name", "")),
                layer_type=str(entry.get("LayerType", "")),
                tactic=tactic,
                sparse="sparse" in tactic.lower(),
                origin=str(entry.get("Metadata", "")),
            )
        )
    return layers


@dataclass
class BuildReport:
    """What a build did, saved next to the engine as ``<engine>.json``."""

    onnx: str
    engine: str
    tensorrt: str
    gpu: str
    precision: str
    sparse: bool
    strongly_typed: bool
    flags: list[str]
    shapes: dict[str, dict[str, list[int]]]
    build_seconds: float
    eligible_layers: list[str]
    sparse_layers: list[str]
    layers: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    note: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def save(self, path: Path) -> None:
        _atomic_write(path, self.to_json().encode())


def report_path(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name + ".json")


# --- GPU ------------------------------------------------------------------------------------------------------


def cuda_compute_capability(device: int = 0) -> tuple[str, tuple[int, int]]:
    """Name and compute capability of a GPU through the CUDA driver (libcuda), or a one-line error."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1" if os.name != "nt" else "nvcuda.dll")
    except OSError:
        raise GraphpruneError(
            "no CUDA driver found (libcuda): TensorRT needs an NVIDIA GPU and its driver"
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


def check_sparse_gpu(name: str, capability: tuple[int, int]) -> None:
    """Sparse tensor cores exist from compute capability 8.0 (Ampere; Orin on Jetson) on."""
    if capability < (8, 0):
        raise GraphpruneError(
            f"{name} has compute capability {capability[0]}.{capability[1]}: sparse tensor cores need 8.0 or "
            "newer (Ampere, Ada, Hopper, Blackwell; Orin on Jetson); build with --no-sparse"
        )


def import_tensorrt() -> Any:
    """``import tensorrt`` with a one-line error when it is missing or broken."""
    try:
        import tensorrt  # lazy on purpose: the rest of graphprune runs without TensorRT
    except ImportError as exc:
        raise GraphpruneError(
            f"TensorRT is not installed ({exc.name or exc}): `pip install tensorrt` (10.x or 11.x) on a machine "
            "with an NVIDIA GPU; `graphprune check` and `graphprune bench --backend torch` work without it"
        ) from None
    except OSError as exc:  # the Python package is there, its libraries (libnvinfer) are not loadable
        raise GraphpruneError(f"TensorRT is installed but cannot load its libraries: {exc}") from None
    return tensorrt


# --- the build ------------------------------------------------------------------------------------------------


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    precision: str = "fp16",
    sparse: bool = True,
    shapes: Sequence[str] = (),
    timing_cache: str | Path | None = None,
    workspace_gb: float | None = None,
) -> BuildReport:
    """Build ``engine_path`` from ``onnx_path`` and save the report beside it (``<engine>.json``)."""
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise GraphpruneError(f"{onnx_path}: no such file")
    ranges = parse_shapes(shapes)
    model = onnx.load_model(str(onnx_path), load_external_data=False)
    trt = import_tensorrt()
    plan = plan_build(trt.__version__, precision, sparse, onnx_precision(model))
    gpu, capability = cuda_compute_capability()
    if sparse:
        check_sparse_gpu(gpu, capability)

    logger = _capturing_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, plan))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise GraphpruneError(f"TensorRT could not parse {onnx_path}: {errors[0] if errors else 'unknown error'}")
    config = builder.create_builder_config()
    for flag in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if workspace_gb is not None:
        if workspace_gb <= 0:
            raise GraphpruneError(f"--workspace must be positive, got {workspace_gb}")
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    _add_profile(builder, network, config, ranges)
    cache_path = Path(timing_cache) if timing_cache else None
    if cache_path is not None:
        data = cache_path.read_bytes() if cache_path.is_file() else b""
        config.set_timing_cache(config.create_timing_cache(data), ignore_mismatch=False)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        errors = [m for m in logger.messages if m.startswith("[E]")]
        raise GraphpruneError(f"TensorRT failed to build the engine: {errors[-1] if errors else 'see the log'}")
    _atomic_write(engine_path, bytes(serialized))
    if cache_path is not None:
        _atomic_write(cache_path, bytes(config.get_timing_cache().serialize()))

    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    inspector = engine.create_engine_inspector()
    layers = parse_inspector_json(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    log = parse_sparsity_log(m[4:] for m in logger.messages)
    report = BuildReport(
        onnx=str(onnx_path),
        engine=str(engine_path),
        tensorrt=trt.__version__,
        gpu=f"{gpu} (sm_{capability[0]}{capability[1]})",
        precision=precision,
        sparse=sparse,
        strongly_typed=plan.strongly_typed,
        flags=list(plan.flags),
        shapes={n: {"min": list(r.min), "opt": list(r.opt), "max": list(r.max)} for n, r in ranges.items()},
        build_seconds=round(seconds, 2),
        eligible_layers=list(log.eligible),
        sparse_layers=list(log.picked),
        layers=[asdict(layer) for layer in layers],
        warnings=[m[4:] for m in logger.messages if m.startswith("[W]")],
        note=plan.note,
    )
    report.save(report_path(engine_path))
    return report


def _network_flags(trt: Any, plan: BuildPlan) -> int:
    if not plan.strongly_typed:
        return 0
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)  # TensorRT 11: always strongly typed, the flag may be gone


def _add_profile(builder: Any, network: Any, config: Any, ranges: dict[str, ShapeRange]) -> None:
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    names = {t.name for t in inputs}
    unknown = sorted(set(ranges) - names)
    if unknown:
        raise GraphpruneError(
            f"--shapes names {unknown[0]!r}, not an input of the model (inputs: {sorted(names)})"
        )
    dynamic = [t for t in inputs if any(d < 0 for d in t.shape)]
    missing = [t.name for t in dynamic if t.name not in ranges]
    if missing:
        first = next(t for t in dynamic if t.name == missing[0])
        dims = "x".join("1" if d < 0 else str(d) for d in first.shape)
        raise GraphpruneError(
            f"input {first.name!r} has dynamic dimensions {tuple(first.shape)}: give --shapes NAME:MIN,OPT,MAX, "
            f"e.g. --shapes {first.name}:{dims},{dims},{dims} with the -1 dimensions filled in"
        )
    if not ranges:
        return
    profile = builder.create_optimization_profile()
    for tensor in inputs:
        if tensor.name in ranges:
            r = ranges[tensor.name]
            if len(r.opt) != len(tensor.shape):
                raise GraphpruneError(
                    f"--shapes {r.name}: rank {len(r.opt)}, the input has rank {len(tensor.shape)}"
                )
            profile.set_shape(tensor.name, r.min, r.opt, r.max)
    config.add_optimization_profile(profile)


def _capturing_logger(trt: Any) -> Any:
    """An ILogger keeping every message at INFO and above as "[X] text" (X: E, W, I)."""

    class _Logger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            tag = {
                trt.ILogger.Severity.INTERNAL_ERROR: "E",
                trt.ILogger.Severity.ERROR: "E",
                trt.ILogger.Severity.WARNING: "W",
                trt.ILogger.Severity.INFO: "I",
            }.get(severity)
            if tag is not None:
                self.messages.append(f"[{tag}] {msg}")

    return _Logger()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- latency of a built engine -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineTiming:
    engine: str
    median_ms: float
    p90_ms: float
    iterations: int
    batch: int  # leading dimension of the first input: throughput = batch / latency

    @property
    def throughput(self) -> float:
        return self.batch * 1000.0 / self.median_ms


def time_engine(
    engine_path: str | Path, shapes: Sequence[str] = (), iterations: int = 100, warmup: int = 10
) -> EngineTiming:
    """Median latency of one engine at the OPT shapes of ``shapes`` (static inputs: their own shape).

    Buffers and CUDA events come from PyTorch (imported lazily); inputs are zeros, which is fine for timing
    dense and sparse engines of the same model against each other.
    """
    trt = import_tensorrt()
    try:
        import torch
    except ImportError:
        raise GraphpruneError(
            "timing engines needs PyTorch with CUDA for device buffers: `pip install torch`"
        ) from None
    if not torch.cuda.is_available():
        raise GraphpruneError("PyTorch sees no CUDA GPU: cannot time a TensorRT engine")
    ranges = parse_shapes(shapes)
    logger = _capturing_logger(trt)
    engine = trt.Runtime(logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise GraphpruneError(
            f"{engine_path}: TensorRT could not load the engine (built for another version or GPU?)"
        )
    context = engine.create_execution_context()
    buffers = []
    batch = 1
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            shape = ranges[name].opt if name in ranges else tuple(engine.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise GraphpruneError(f"input {name!r} is dynamic: give --shapes {name}:MIN,OPT,MAX")
            context.set_input_shape(name, shape)
            if not buffers:
                batch = shape[0] if shape else 1
            tensor = torch.zeros(
                shape, dtype=_torch_dtype(torch, trt, engine.get_tensor_dtype(name)), device="cuda"
            )
            context.set_tensor_address(name, tensor.data_ptr())
            buffers.append(tensor)
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            shape = tuple(context.get_tensor_shape(name))
            tensor = torch.empty(
                shape, dtype=_torch_dtype(torch, trt, engine.get_tensor_dtype(name)), device="cuda"
            )
            context.set_tensor_address(name, tensor.data_ptr())
            buffers.append(tensor)
    stream = torch.cuda.Stream()
    times = []
    for n in range(warmup + iterations):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        context.execute_async_v3(stream.cuda_stream)
        end.record(stream)
        end.synchronize()
        if n >= warmup:
            times.append(start.elapsed_time(end))
    times.sort()
    return EngineTiming(str(engine_path), times[len(times) // 2], times[int(len(times) * 0.9)], iterations, batch)


def _torch_dtype(torch: Any, trt: Any, dtype: Any) -> Any:
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT8: torch.int8,
        trt.DataType.BOOL: torch.bool,
    }
    for name, torch_type in (("BF16", torch.bfloat16), ("INT64", torch.int64)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = torch_type
    if dtype not in table:
        raise GraphpruneError(f"engine I/O type {dtype} is not supported by the timing loop")
    return table[dtype]
