"""The parts of a TensorRT build that are pure functions: options, plans, log parsing, the report's verdict.

Real engines are built in ``test_tensorrt_rtx.py`` (TensorRT-RTX from PyPI, no GPU needed). What stays here with
text MODELLED on NVIDIA's documentation, not captured from a real build, is only what no build on this machine can
produce: full TensorRT 10/11's "(Sparsity)" log lines and its engine inspector JSON (both need a GPU). The
TensorRT-RTX layer-list excerpt below was captured from a real TensorRT-RTX 1.7.1.116 build of the test decoder.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from graphprune.cli import app
from graphprune.errors import GraphpruneError
from graphprune.tensorrt import build as tb
from graphprune.tensorrt import logs, outputs
from graphprune.tensorrt.backends import BACKENDS, load_backend
from graphprune.tensorrt.profiles import ShapeRange, check_profiles, model_inputs, parse_shapes
from graphprune.tensorrt.report import BuildReport, Sparsity, sparsity_verdict
from tests.onnx_builders import init, make_model, tensor

# MODELLED on the developer guide's example (trtexec prefixes each line with date and severity): full TensorRT.
TRTEXEC_LOG = """\
[03/23/2021-00:14:05] [I] [TRT] Some other line
[03/23/2021-00:14:05] [I] [TRT] (Sparsity) Layers eligible for sparse math: conv1, conv2, conv3
[03/23/2021-00:14:05] [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: conv2, conv3
"""
# MODELLED: the same messages as a custom ILogger receives them: no prefix; fused layers joined with " + ".
ILOGGER_LOG = [
    "Local timing cache in use.",
    "(Sparsity) Layers eligible for sparse math: /l0/fc1/MatMul + /l0/act/Mul, /l0/fc2/MatMul, /l1/fc1/MatMul",
    "(Sparsity) TRT inference plan picked sparse implementation for layers: /l0/fc1/MatMul + /l0/act/Mul",
]
# MODELLED on IEngineInspector JSON with ProfilingVerbosity.DETAILED (fields: Name, LayerType, TacticName, ...).
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
# CAPTURED from TensorRT-RTX 1.7.1.116 (verbose "Layers:" message, shortened to one layer of each kind).
RTX_LAYERS = (
    "Layers:\n"
    "Name: __mye12909_0_myl0_0, LayerType: shape_call, Inputs: [], Constants: [], Outputs: [], TacticName: , "
    "StreamId: 0, Metadata: \n"
    "Name: /layers.0.self_attn.v_proj/MatMul+/layers.0.self_attn.k_proj/MatMul_myl0_3, LayerType: gemm, Inputs: "
    "[ { Name: __tran23848_myl0, Dimensions: [-1,256], Strides: [256,1], StrideOrder: [1,0], Datatype: Half, "
    "Format: (Linear) Row major linear format }], Constants: [], Outputs: [], TacticName: __myelin_CASK_STUB, "
    "StreamId: 0, Metadata: [ONNX Layer: /layers.0.self_attn.v_proj/MatMul]\x1f[ONNX Layer: "
    "/layers.0.self_attn.k_proj/MatMul]\n"
    "\nI/O Tensors:\n"
    " Name: input_ids, IOMode: Input, DataType: Int64, Dimensions: [-1,-1], Location: Device, "
    "IsShapeInferenceIO: false, ProfileInfo: [ { MinShape: [1,1], OptShape: [4,64], MaxShape: [8,256], "
    "Format: Row major linear INT64 format (kLINEAR) }]\n"
    " Name: logits, IOMode: Output, DataType: Float, Dimensions: [-1,-1,256], Location: Device, "
    "IsShapeInferenceIO: false, ProfileInfo: [ { Format: Row major linear FP32 format (kLINEAR) }]\n"
    "\nEngine Metadata:\n Multi-Device: Disabled"
)
RTX_DEFERRED = "Compiler backend is used during engine execution."


# --- log parsing -------------------------------------------------------------------------------------------


def test_parse_sparsity_log_trtexec_and_ilogger_forms() -> None:
    log = logs.parse_sparsity_log(TRTEXEC_LOG.splitlines())
    assert log.eligible == ("conv1", "conv2", "conv3") and log.picked == ("conv2", "conv3") and log.seen
    log = logs.parse_sparsity_log(ILOGGER_LOG)
    assert log.eligible == ("/l0/fc1/MatMul + /l0/act/Mul", "/l0/fc2/MatMul", "/l1/fc1/MatMul")
    assert log.picked == ("/l0/fc1/MatMul + /l0/act/Mul",)
    assert logs.parse_sparsity_log(["nothing about sparsity"]) == logs.SparsityLog((), (), False)


def test_sparsity_mentions_are_verbatim_with_severity() -> None:
    lines = [logs.LogLine("I", text) for text in ILOGGER_LOG] + [logs.LogLine("V", RTX_LAYERS)]
    lines.append(logs.LogLine("W", "SPARSE_WEIGHTS set but no weight is 2:4"))
    assert logs.sparsity_mentions(lines) == [
        f"[I] {ILOGGER_LOG[1]}",
        f"[I] {ILOGGER_LOG[2]}",
        "[W] SPARSE_WEIGHTS set but no weight is 2:4",
    ]


def test_parse_inspector_detailed_and_names_only() -> None:
    layers = logs.parse_inspector_json(INSPECTOR_JSON)
    assert [layer.sparse_tactic for layer in layers] == [True, False, False]
    assert layers[0].origin == "[ONNX Layer: /l0/fc1/MatMul]"
    names_only = logs.parse_inspector_json(json.dumps({"Layers": ["a", "b"], "I/O Tensors": []}))
    assert [(layer.name, layer.sparse_tactic) for layer in names_only] == [("a", False), ("b", False)]
    with pytest.raises(GraphpruneError, match="not JSON"):
        logs.parse_inspector_json("{oops")


def test_parse_builder_layers_and_io_from_a_captured_rtx_log() -> None:
    lines = [logs.LogLine("I", "Layers: not the verbose list"), logs.LogLine("V", RTX_LAYERS)]
    layers = logs.parse_builder_layers(lines)
    assert [(layer.name[:9], layer.layer_type, layer.tactic) for layer in layers] == [
        ("__mye1290", "shape_call", ""),
        ("/layers.0", "gemm", "__myelin_CASK_STUB"),
    ]
    assert layers[1].origin.split("\x1f") == [
        "[ONNX Layer: /layers.0.self_attn.v_proj/MatMul]",
        "[ONNX Layer: /layers.0.self_attn.k_proj/MatMul]",
    ]
    assert not any(layer.sparse_tactic for layer in layers)
    io = logs.parse_builder_io(lines)
    assert [(t.name, t.mode, t.dtype, t.dims) for t in io] == [
        ("input_ids", "Input", "Int64", (-1, -1)),
        ("logits", "Output", "Float", (-1, -1, 256)),
    ]
    assert io[0].profiles == ({"min": [1, 1], "opt": [4, 64], "max": [8, 256]},)
    assert io[1].profiles == ()


# --- the verdict claims nothing the sources do not say -----------------------------------------------------


def test_sparsity_verdict() -> None:
    none = logs.SparsityLog((), (), False)
    stub = [
        logs.LayerInfo(
            name="gemm0", layer_type="gemm", tactic="__myelin_CASK_STUB", sparse_tactic=False, origin=""
        )
    ]
    assert "dense build" in sparsity_verdict("TensorRT", False, logs.parse_sparsity_log(ILOGGER_LOG), [], "", None)
    seen = sparsity_verdict("TensorRT", True, logs.parse_sparsity_log(ILOGGER_LOG), [], "", None)
    assert seen.startswith("builder log: 1 of 3 layers eligible")
    inspected = logs.parse_inspector_json(INSPECTOR_JSON)
    assert sparsity_verdict("TensorRT", True, none, inspected, "engine inspector", None).startswith(
        "1 layers have a sparse tactic (engine inspector)"
    )
    deferred = sparsity_verdict("TensorRT-RTX", True, none, stub, "builder log", RTX_DEFERRED)
    assert f'("{RTX_DEFERRED}")' in deferred and "not known at build time" in deferred
    assert "none of the 1 layers in the builder log has a sparse tactic" in deferred
    assert sparsity_verdict("TensorRT", True, none, [], "", None).endswith("no layer is known to run sparse")


# --- options, profiles, plans ------------------------------------------------------------------------------


def test_parse_shapes() -> None:
    ranges = parse_shapes(["input_ids:1x16,8x128,32x512", "onnx::Shape_1:1,2,3"])
    assert ranges["input_ids"] == ShapeRange("input_ids", (1, 16), (8, 128), (32, 512))
    assert ranges["onnx::Shape_1"].opt == (2,)  # names may contain colons
    for bad in ["x", "x:1,2", "x:1x2,1,1", "x:4,2,8", ":1,1,1", "x:1,a,2", "x:", "x:1x", "x:1,2,3,4"]:
        with pytest.raises(GraphpruneError, match="`shapes`"):
            parse_shapes([bad])


def test_one_shape_is_a_static_profile() -> None:
    ranges = parse_shapes(["images:1x3x320x320", "ids:4"])
    assert ranges["images"] == ShapeRange("images", (1, 3, 320, 320), (1, 3, 320, 320), (1, 3, 320, 320))
    assert ranges["ids"].as_dict() == {"min": [4], "opt": [4], "max": [4]}
    check_profiles({"images": (None, 3, None, None)}, {"images": ranges["images"]})
    with pytest.raises(GraphpruneError, match="dimension 1 is fixed to 3 in the model"):
        check_profiles({"images": (None, 3, None, None)}, parse_shapes(["images:1x4x320x320"]))


def tiny_model(dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """``y = x @ w`` with ``x: [b, 8]`` (one dynamic, one fixed dimension) and ``w`` also listed as an input."""
    weight = np.zeros((8, 8), np.float16 if dtype == TensorProto.FLOAT16 else np.float32)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    model = make_model([node], [tensor("x", dtype, ["b", 8])], [tensor("y", dtype, ["b", 8])], [init(weight, "w")])
    model.graph.input.append(tensor("w", dtype, [8, 8]))  # an overridable initializer is not a runtime input
    return model


def test_check_profiles_against_the_onnx_inputs() -> None:
    inputs = model_inputs(tiny_model())
    assert inputs == {"x": (None, 8)}
    check_profiles(inputs, parse_shapes(["x:1x8,4x8,16x8"]))
    cases = {
        "x:1x16,4x16,16x16": r"dimension 1 is fixed to 8 in the model \(\?x8\), the profile gives 16,16,16",
        "x:1,4,16": r"rank 1, but the input has rank 2",
        "y:1x8,1x8,1x8": r"not an input of the model \(inputs: \['x'\]\)",
    }
    for spec, message in cases.items():
        with pytest.raises(GraphpruneError, match=message):
            check_profiles(inputs, parse_shapes([spec]))
    with pytest.raises(GraphpruneError, match=r"'x' has dynamic dimensions \(\?x8\).*`shapes`.* x:1x8,1x8,1x8"):
        check_profiles(inputs, {})


@pytest.mark.parametrize(
    ("backend", "version", "precision", "model", "typed", "flags", "computes"),
    [
        ("tensorrt", "10.9.0", None, "fp32", False, ("FP16", "SPARSE_WEIGHTS"), "fp16"),
        ("tensorrt", "10.9.0", "bf16", "fp32", False, ("BF16", "SPARSE_WEIGHTS"), "bf16"),
        ("tensorrt", "10.9.0", "int8-qdq", "int8-qdq", True, ("SPARSE_WEIGHTS",), "int8-qdq"),
        ("tensorrt", "10.9.0", None, "fp16", True, ("SPARSE_WEIGHTS",), "fp16"),
        ("tensorrt", "11.1.0", "fp16", "fp16", True, ("SPARSE_WEIGHTS",), "fp16"),
        ("tensorrt", "11.1.0", None, "bf16", True, ("SPARSE_WEIGHTS",), "bf16"),
        ("tensorrt", "11.1.0", None, "fp32", True, ("SPARSE_WEIGHTS",), "fp32"),
        ("tensorrt-rtx", "1.7.1.116", None, "fp16", True, ("SPARSE_WEIGHTS",), "fp16"),
        ("tensorrt-rtx", "1.7.1.116", "fp16", "fp32", True, ("SPARSE_WEIGHTS",), "fp32"),
    ],
)
def test_plan_build(
    backend: str,
    version: str,
    precision: str | None,
    model: str,
    typed: bool,
    flags: tuple[str, ...],
    computes: str,
) -> None:
    plan = tb.plan_build(BACKENDS[backend], version, precision, True, model, "m.onnx")
    assert (plan.strongly_typed, plan.flags, plan.precision) == (typed, flags, computes)
    # Only a strongly typed FP32 build warns, in one line that points to `graphprune convert`.
    if typed and model == "fp32":
        (warning,) = plan.warnings
        assert (
            "sparse tensor cores need FP16, BF16 or INT8" in warning
            and "convert m.onnx to FP16 first (`graphprune convert`" in warning
        )
        assert "\n" not in warning
    else:
        assert plan.warnings == ()
    dense = tb.plan_build(BACKENDS[backend], version, precision, False, model)
    assert "SPARSE_WEIGHTS" not in dense.flags and dense.warnings == ()


def test_plan_build_errors() -> None:
    trt = BACKENDS["tensorrt"]
    with pytest.raises(GraphpruneError, match="too old"):
        tb.plan_build(trt, "8.6.1", "fp16", True, "fp32")
    with pytest.raises(GraphpruneError, match="already BF16"):
        tb.plan_build(trt, "10.9.0", "fp16", True, "bf16")
    with pytest.raises(GraphpruneError, match="unknown precision"):
        tb.plan_build(BACKENDS["tensorrt-rtx"], "1.7", "fp8", True, "fp32")


def test_check_sparse_gpu() -> None:
    tb.check_sparse_gpu("NVIDIA A100", (8, 0))
    with pytest.raises(GraphpruneError, match=r"compute capability 7\.5: sparse tensor cores need 8\.0"):
        tb.check_sparse_gpu("Tesla T4", (7, 5))


# --- writing: all or nothing -------------------------------------------------------------------------------


def _tiny_onnx(path: Path) -> Path:
    onnx.save_model(tiny_model(), str(path))
    return path


def test_plan_outputs_refuses_an_existing_report_without_force(tmp_path: Path) -> None:
    model, engine = _tiny_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine"
    (tmp_path / "m.engine.json").write_text("a report of someone else's")  # the engine itself is new
    with pytest.raises(GraphpruneError, match=r"m\.engine\.json exists; pass `force=True`"):
        outputs.plan_outputs(model, engine, None, force=False)
    outputs.plan_outputs(model, engine, None, force=True)
    assert (tmp_path / "m.engine.json").read_text() == "a report of someone else's"


def test_plan_outputs_checks_every_file(tmp_path: Path) -> None:
    model, engine = _tiny_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine"
    (tmp_path / "file").write_bytes(b"")
    (tmp_path / "trt.cache").write_bytes(b"old cache")
    outputs.plan_outputs(model, engine, tmp_path / "trt.cache", force=False)  # a cache is updated on purpose
    cases = [
        (tmp_path / "file" / "m.engine", None, "cannot write"),
        (tmp_path, None, "is a directory"),
        (model, None, "is the input model"),
        (engine, engine, "the timing cache and the engine would both be written"),
        (engine, model, "is the input model"),
    ]
    for target, cache, message in cases:
        with pytest.raises(GraphpruneError, match=message):
            outputs.plan_outputs(model, target, cache, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "m.onnx", "trt.cache"]  # probes leave nothing


@pytest.mark.tensorrt
@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx_bindings") is None, reason="needs the trt-rtx extra")
def test_build_engine_refuses_to_replace_its_report_without_force(tmp_path: Path) -> None:
    model, engine = _tiny_onnx(tmp_path / "m.onnx"), tmp_path / "m.engine"
    (tmp_path / "m.engine.json").write_text("keep me")
    with pytest.raises(GraphpruneError, match="exists; pass `force=True`"):
        tb.build_engine(model, engine, shapes=["x:1x8,2x8,4x8"], backend="tensorrt-rtx")
    assert not engine.exists() and (tmp_path / "m.engine.json").read_text() == "keep me"
    report = tb.build_engine(model, engine, shapes=["x:1x8,2x8,4x8"], backend="tensorrt-rtx", force=True)
    assert json.loads((tmp_path / "m.engine.json").read_text()) == json.loads(report.to_json())
    assert engine.stat().st_size == report.engine_bytes


# --- no TensorRT at all ------------------------------------------------------------------------------------


def test_missing_tensorrt_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for module in ("tensorrt", "tensorrt_rtx_bindings"):
        monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(GraphpruneError, match="no TensorRT is installed"):
        load_backend()
    with pytest.raises(
        GraphpruneError, match=r'TensorRT-RTX is not installed.*pip install "graphprune\[trt-rtx\]"'
    ):
        load_backend("tensorrt-rtx")
    with pytest.raises(GraphpruneError, match="unknown `backend` 'trt'"):
        load_backend("trt")
    onnx.save_model(tiny_model(), str(tmp_path / "m.onnx"))
    result = CliRunner().invoke(app, ["build", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "m.engine")])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: no TensorRT is installed")
    assert len(result.output.strip().splitlines()) == 1  # one line, no traceback
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_default_backend_prefers_full_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the import order is under test: a bare STAND-IN module named ``tensorrt`` (full TensorRT cannot be
    installed here), then none, then TensorRT-RTX's real module, if installed."""
    stand_in = types.ModuleType("tensorrt")
    stand_in.__version__ = "10.9.0"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", stand_in)
    loaded = load_backend()
    assert (loaded.backend.name, loaded.trt, loaded.label) == ("tensorrt", stand_in, "TensorRT 10.9.0")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    if importlib.util.find_spec("tensorrt_rtx_bindings") is not None:
        assert load_backend().backend.name == "tensorrt-rtx"


# --- the CLI's sparsity table, from a MODELLED full-TensorRT report (no build on this machine logs these) ------


def test_cli_renders_full_tensorrt_sparsity_lines_modelled(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    log = logs.parse_sparsity_log(ILOGGER_LOG)
    layers = logs.parse_inspector_json(INSPECTOR_JSON)
    report = BuildReport(
        onnx="m.onnx",
        engine=str(tmp_path / "m.engine"),
        engine_bytes=2 << 20,
        backend="tensorrt",
        product="TensorRT",
        version="10.9.0",
        gpu="modelled GPU (sm_90)",
        precision="fp16",
        strongly_typed=True,
        flags=["SPARSE_WEIGHTS"],
        profiles=[],
        build_seconds=1.0,
        parser={"onnx_nodes": 3, "network_layers": 3},
        sparsity=Sparsity(
            flag=True,
            lines=[f"[I] {line}" for line in ILOGGER_LOG[1:]],
            eligible_layers=list(log.eligible),
            sparse_layers=list(log.picked),
            sparse_tactic_layers=["/l0/fc1/MatMul + /l0/act/Mul"],
            verdict=sparsity_verdict("TensorRT", True, log, layers, "engine inspector", None),
        ),
        layers_source="engine inspector",
    )
    monkeypatch.setattr(tb, "build_engine", lambda *args, **kwargs: report)
    result = CliRunner().invoke(app, ["build", "m.onnx", "-o", str(tmp_path / "m.engine")], terminal_width=200)
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if "/MatMul" in line]
    assert len(rows) == 3
    assert rows[0].rstrip().endswith("yes") and "dense faster" in rows[1] and "dense faster" in rows[2]
    assert "sparsity: builder log: 1 of 3 layers eligible for sparse math picked a sparse implementation" in (
        result.output
    )


# --- full TensorRT on a GPU (not available to this project: skipped) ---------------------------------------


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
    from tests.references import sparse_24

    weight = sparse_24((1024, 1024), 0).astype(np.float16)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")
    model = make_model(
        [node],
        [tensor("x", TensorProto.FLOAT16, [512, 1024])],
        [tensor("y", TensorProto.FLOAT16, [512, 1024])],
        [init(weight, "w")],
    )
    onnx.save_model(model, str(tmp_path / "m.onnx"))
    report = tb.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", backend="tensorrt")
    assert report.sparsity.eligible_layers, "TensorRT found no layer eligible for sparse math"
    assert set(report.sparsity.sparse_layers) <= set(report.sparsity.eligible_layers)
    assert report.layers_source == "engine inspector"


@pytest.mark.skipif(tb.has_cuda_gpu(), reason="a GPU is present: bench would run")
def test_bench_tensorrt_without_a_gpu_is_one_line_before_building(tmp_path: Path) -> None:
    onnx.save_model(tiny_model(), str(tmp_path / "m.onnx"))
    result = CliRunner().invoke(app, ["bench", str(tmp_path / "m.onnx"), "--backend", "tensorrt-rtx"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: timing engines needs an NVIDIA GPU and its driver (none found here); `graphprune build` does not"
    ]
