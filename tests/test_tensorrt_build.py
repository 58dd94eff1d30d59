"""Everything around TensorRT that can be checked without it.

* Log and inspector fixtures below are MODELLED on TensorRT's documented messages (developer guide, "Structured
  Sparsity"; engine inspector JSON schema), not captured from a real build.
* The fake ``tensorrt`` module injected with monkeypatch checks the option plumbing (flags, profiles, workspace,
  timing cache, report). It is NOT evidence that an engine builds with real TensorRT.
* Tests marked ``tensorrt`` need TensorRT installed, ``gpu`` a CUDA GPU; they are skipped otherwise.
"""

from __future__ import annotations

import ctypes
import enum
import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from graphprune.cli import app
from graphprune.errors import GraphpruneError
from graphprune.tensorrt import build as tb
from tests.onnx_builders import init, make_model, tensor

# Modelled on the developer guide's example (trtexec prefixes each line with date and severity).
TRTEXEC_LOG = """\
[03/23/2021-00:14:05] [I] [TRT] Some other line
[03/23/2021-00:14:05] [I] [TRT] (Sparsity) Layers eligible for sparse math: conv1, conv2, conv3
[03/23/2021-00:14:05] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: conv2, conv3
"""
# The same messages as a custom ILogger receives them: no prefix; fused layers joined with " + ".
ILOGGER_LOG = [
    "Local timing cache in use.",
    "(Sparsity) Layers eligible for sparse math: /l0/fc1/MatMul + /l0/act/Mul, /l0/fc2/MatMul, /l1/fc1/MatMul",
    "(Sparsity) TRT inference plan picked sparse implementation for layers: /l0/fc1/MatMul + /l0/act/Mul",
]
# Modelled on IEngineInspector JSON with ProfilingVerbosity.DETAILED (fields: Name, LayerType, TacticName, ...).
INSPECTOR_JSON = json.dumps(
    {
        "Layers": [
            {
                "Name": "/l0/fc1/MatMul + /l0/act/Mul",
                "LayerType": "CaskGemmMatrixMultiply",
                "TacticName": "sm90_xmma_sparse_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64",
                "Metadata": "[ONNX Layer: /l0/fc1/MatMul]",
            },
            {
                "Name": "/l0/fc2/MatMul",
                "LayerType": "CaskGemmMatrixMultiply",
                "TacticName": "sm90_xmma_gemm_f16f16",
            },
            {"Name": "/l0/ln", "LayerType": "Normalization", "TacticName": "0x0"},
        ],
        "Bindings": ["x", "y"],
    }
)


# --- pure parsing ------------------------------------------------------------------------------------------


def test_parse_sparsity_log_trtexec_and_ilogger_forms() -> None:
    log = tb.parse_sparsity_log(TRTEXEC_LOG.splitlines())
    assert log.eligible == ("conv1", "conv2", "conv3") and log.picked == ("conv2", "conv3") and log.seen
    log = tb.parse_sparsity_log(ILOGGER_LOG)
    assert log.eligible == ("/l0/fc1/MatMul + /l0/act/Mul", "/l0/fc2/MatMul", "/l1/fc1/MatMul")
    assert log.picked == ("/l0/fc1/MatMul + /l0/act/Mul",)
    assert tb.parse_sparsity_log(["nothing about sparsity"]) == tb.SparsityLog((), (), False)


def test_parse_inspector_detailed_and_names_only() -> None:
    layers = tb.parse_inspector_json(INSPECTOR_JSON)
    assert [layer.sparse for layer in layers] == [True, False, False]
    assert layers[0].origin == "[ONNX Layer: /l0/fc1/MatMul]"
    names_only = tb.parse_inspector_json(json.dumps({"Layers": ["a", "b"], "I/O Tensors": []}))
    assert [(layer.name, layer.sparse) for layer in names_only] == [("a", False), ("b", False)]
    with pytest.raises(GraphpruneError, match="not JSON"):
        tb.parse_inspector_json("{oops")


def test_parse_shapes() -> None:
    ranges = tb.parse_shapes(["input_ids:1x16,8x128,32x512", "onnx::Shape_1:1,2,3"])
    assert ranges["input_ids"] == tb.ShapeRange("input_ids", (1, 16), (8, 128), (32, 512))
    assert ranges["onnx::Shape_1"].opt == (2,)  # names may contain colons
    for bad in ["x", "x:1,2", "x:1x2,1,1", "x:4,2,8", ":1,1,1", "x:1,a,2"]:
        with pytest.raises(GraphpruneError, match="--shapes"):
            tb.parse_shapes([bad])


@pytest.mark.parametrize(
    ("version", "precision", "model", "typed", "flags"),
    [
        ("10.9.0", "fp16", "fp32", False, ("FP16", "SPARSE_WEIGHTS")),
        ("10.9.0", "bf16", "fp32", False, ("BF16", "SPARSE_WEIGHTS")),
        ("10.9.0", "int8-qdq", "int8-qdq", True, ("SPARSE_WEIGHTS",)),
        ("10.9.0", "fp16", "fp16", True, ("SPARSE_WEIGHTS",)),
        ("11.1.0", "fp16", "fp16", True, ("SPARSE_WEIGHTS",)),
        ("11.1.0", "bf16", "bf16", True, ("SPARSE_WEIGHTS",)),
    ],
)
def test_plan_build(version: str, precision: str, model: str, typed: bool, flags: tuple[str, ...]) -> None:
    plan = tb.plan_build(version, precision, True, model)
    assert (plan.strongly_typed, plan.flags) == (typed, flags)
    assert "SPARSE_WEIGHTS" not in tb.plan_build(version, precision, False, model).flags


def test_plan_build_errors() -> None:
    with pytest.raises(GraphpruneError, match="graphprune convert MODEL --fp16"):
        tb.plan_build("11.0.0", "fp16", True, "fp32")
    with pytest.raises(GraphpruneError, match="too old"):
        tb.plan_build("8.6.1", "fp16", True, "fp32")
    with pytest.raises(GraphpruneError, match="already BF16"):
        tb.plan_build("10.9.0", "fp16", True, "bf16")
    with pytest.raises(GraphpruneError, match="unknown precision"):
        tb.plan_build("10.9.0", "fp8", True, "fp32")


def test_check_sparse_gpu() -> None:
    tb.check_sparse_gpu("NVIDIA A100", (8, 0))
    with pytest.raises(GraphpruneError, match=r"compute capability 7\.5: sparse tensor cores need 8\.0"):
        tb.check_sparse_gpu("Tesla T4", (7, 5))


# --- TensorRT missing --------------------------------------------------------------------------------------


def test_missing_tensorrt_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    with pytest.raises(GraphpruneError, match="TensorRT is not installed"):
        tb.import_tensorrt()
    onnx.save_model(tiny_model(), str(tmp_path / "m.onnx"))
    result = CliRunner().invoke(app, ["build", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "m.engine")])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: TensorRT is not installed")
    assert len(result.output.strip().splitlines()) == 1  # one line, no traceback


# --- option plumbing with a fake tensorrt (NOT evidence that an engine builds) -----------------------------


def tiny_model(dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    weight = np.zeros((8, 8), np.float16 if dtype == TensorProto.FLOAT16 else np.float32)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    return make_model([node], [tensor("x", dtype, ["b", 8])], [tensor("y", dtype, ["b", 8])], [init(weight, "w")])


def fake_tensorrt(version: str = "10.9.0", parse_ok: bool = True) -> tuple[types.ModuleType, dict[str, Any]]:
    """A stand-in exposing the names build_engine uses, recording what it is asked to do."""
    seen: dict[str, Any] = {"flags": [], "profiles": [], "pool": None, "cache_in": None, "network_flags": None}
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.BuilderFlag = enum.Enum("BuilderFlag", "FP16 BF16 INT8 SPARSE_WEIGHTS")
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 1})
    trt.MemoryPoolType = enum.Enum("MemoryPoolType", "WORKSPACE")
    trt.ProfilingVerbosity = enum.Enum("ProfilingVerbosity", "LAYER_NAMES_ONLY DETAILED NONE")
    trt.LayerInformationFormat = enum.Enum("LayerInformationFormat", "ONELINE JSON")

    class ILogger:
        Severity = enum.Enum("Severity", "INTERNAL_ERROR ERROR WARNING INFO VERBOSE")

        def __init__(self) -> None:
            pass

    trt.ILogger = ILogger

    class Input:
        def __init__(self, name: str, shape: tuple[int, ...]) -> None:
            self.name, self.shape = name, shape

    class Network:
        num_inputs = 1

        def get_input(self, i: int) -> Input:
            return Input("x", (-1, 8))

    class Profile:
        def set_shape(self, name: str, lo: tuple, opt: tuple, hi: tuple) -> None:
            seen["profiles"].append((name, lo, opt, hi))

    class Cache:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def serialize(self) -> bytes:
            return b"cache:" + self.data

    class Config:
        profiling_verbosity = None

        def set_flag(self, flag: Any) -> None:
            seen["flags"].append(flag.name)

        def set_memory_pool_limit(self, pool: Any, size: int) -> None:
            seen["pool"] = (pool.name, size)

        def add_optimization_profile(self, profile: Profile) -> None:
            seen["profile_added"] = True

        def create_timing_cache(self, data: bytes) -> Cache:
            seen["cache_in"] = data
            return Cache(data)

        def set_timing_cache(self, cache: Cache, ignore_mismatch: bool) -> None:
            self.cache = cache

        def get_timing_cache(self) -> Cache:
            return self.cache

    class Builder:
        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def create_network(self, flags: int) -> Network:
            seen["network_flags"] = flags
            return Network()

        def create_builder_config(self) -> Config:
            seen["config"] = config = Config()
            return config

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes:
            seen["verbosity"] = config.profiling_verbosity.name
            for line in ILOGGER_LOG:
                self.logger.log(ILogger.Severity.INFO, line)
            self.logger.log(ILogger.Severity.WARNING, "modelled warning")
            self.logger.log(ILogger.Severity.VERBOSE, "dropped")
            return b"ENGINE"

    class Error:
        def desc(self) -> str:
            return "modelled parser error"

    class OnnxParser:
        num_errors = 1

        def __init__(self, network: Network, logger: Any) -> None:
            pass

        def parse_from_file(self, path: str) -> bool:
            seen["parsed"] = path
            return parse_ok

        def get_error(self, i: int) -> Error:
            return Error()

    class Inspector:
        def get_engine_information(self, fmt: Any) -> str:
            return INSPECTOR_JSON

    class Engine:
        def create_engine_inspector(self) -> Inspector:
            return Inspector()

    class Runtime:
        def __init__(self, logger: Any) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes) -> Engine:
            return Engine()

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    return trt, seen


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch):
    def install(version: str = "10.9.0", parse_ok: bool = True, capability: tuple[int, int] = (9, 0)):
        trt, seen = fake_tensorrt(version, parse_ok)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setattr(tb, "cuda_compute_capability", lambda device=0: ("Fake GPU", capability))
        return seen

    return install


def test_fake_build_plumbs_every_option(fake, tmp_path: Path) -> None:
    seen = fake()
    source, engine, cache = tmp_path / "m.onnx", tmp_path / "out" / "m.engine", tmp_path / "trt.cache"
    onnx.save_model(tiny_model(), str(source))
    cache.write_bytes(b"old")
    report = tb.build_engine(source, engine, "fp16", True, ["x:1x8,4x8,16x8"], cache, 2.0)
    assert seen["flags"] == ["FP16", "SPARSE_WEIGHTS"] and seen["network_flags"] == 0
    assert seen["profiles"] == [("x", (1, 8), (4, 8), (16, 8))] and seen["profile_added"]
    assert seen["pool"] == ("WORKSPACE", 2 * (1 << 30))
    assert seen["verbosity"] == "DETAILED"
    assert seen["cache_in"] == b"old" and cache.read_bytes() == b"cache:old"
    assert engine.read_bytes() == b"ENGINE"
    saved = json.loads(tb.report_path(engine).read_text())
    assert saved["eligible_layers"] == report.eligible_layers == list(tb.parse_sparsity_log(ILOGGER_LOG).eligible)
    assert saved["sparse_layers"] == ["/l0/fc1/MatMul + /l0/act/Mul"]
    assert [layer["sparse"] for layer in saved["layers"]] == [True, False, False]
    assert saved["warnings"] == ["modelled warning"]


def test_fake_trt11_needs_a_half_onnx(fake, tmp_path: Path) -> None:
    seen = fake("11.0.0")
    source = tmp_path / "m.onnx"
    onnx.save_model(tiny_model(), str(source))
    with pytest.raises(GraphpruneError, match="strongly typed"):
        tb.build_engine(source, tmp_path / "m.engine", "fp16", True, ["x:1x8,4x8,16x8"])
    onnx.save_model(tiny_model(TensorProto.FLOAT16), str(source))
    tb.build_engine(source, tmp_path / "m.engine", "fp16", True, ["x:1x8,4x8,16x8"])
    assert seen["flags"] == ["SPARSE_WEIGHTS"] and seen["network_flags"] == 2  # 1 << STRONGLY_TYPED


def test_fake_build_errors_are_one_line(fake, tmp_path: Path) -> None:
    source = tmp_path / "m.onnx"
    onnx.save_model(tiny_model(), str(source))
    fake()
    with pytest.raises(GraphpruneError, match="dynamic dimensions") as missing:
        tb.build_engine(source, tmp_path / "m.engine")
    assert "\n" not in str(missing.value)
    with pytest.raises(GraphpruneError, match="not an input"):
        tb.build_engine(source, tmp_path / "m.engine", shapes=["y:1x8,1x8,1x8"])
    fake(parse_ok=False)
    with pytest.raises(GraphpruneError, match="modelled parser error"):
        tb.build_engine(source, tmp_path / "m.engine", shapes=["x:1x8,4x8,16x8"])
    fake(capability=(7, 5))
    with pytest.raises(GraphpruneError, match=r"compute capability 7\.5"):
        tb.build_engine(source, tmp_path / "m.engine", shapes=["x:1x8,4x8,16x8"])


def test_cli_build_prints_the_sparse_table(fake, tmp_path: Path) -> None:
    fake()
    source = tmp_path / "m.onnx"
    onnx.save_model(tiny_model(), str(source))
    args = ["build", str(source), "-o", str(tmp_path / "m.engine"), "--shapes", "x:1x8,4x8,16x8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "1 of 3 eligible layers run sparse" in result.output
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "--force" in again.output


# --- real TensorRT / GPU -----------------------------------------------------------------------------------


def _has_cuda_driver() -> bool:
    try:
        return ctypes.CDLL("libcuda.so.1").cuInit(0) == 0
    except OSError:
        return False


@pytest.mark.gpu
def test_real_gpu_compute_capability() -> None:
    if not _has_cuda_driver():
        pytest.skip("no CUDA driver / GPU")
    name, capability = tb.cuda_compute_capability()
    assert name and capability >= (3, 0)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_real_tensorrt_build_reports_sparse_layers(tmp_path: Path) -> None:
    pytest.importorskip("tensorrt")
    if not _has_cuda_driver():
        pytest.skip("no CUDA driver / GPU")
    from tests.test_eligibility import sparse_24

    weight = sparse_24((1024, 1024), 0).astype(np.float16)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")
    model = make_model(
        [node],
        [tensor("x", TensorProto.FLOAT16, [512, 1024])],
        [tensor("y", TensorProto.FLOAT16, [512, 1024])],
        [init(weight, "w")],
    )
    onnx.save_model(model, str(tmp_path / "m.onnx"))
    report = tb.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", "fp16", True)
    assert report.eligible_layers, "TensorRT found no layer eligible for sparse math"
