"""Real engines, built on any machine: TensorRT-RTX from PyPI builds ahead of time without a GPU.

The quickstart's output (paraphrase-MiniLM-L3 pruned to 2:4 and converted to FP16) and a small SmolLM2-like decoder
go through the real ONNX parser and builder with SPARSE_WEIGHTS and dynamic-shape profiles. Each fact the report
states is checked against a source the build did not write: the ONNX file itself, the parser's own support query,
the runtime's header check, the installed package's metadata. Three real builds in all (about a second each).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from graphprune import demo
from graphprune.cli import app
from graphprune.tensorrt.backends import load_backend
from graphprune.tensorrt.build import build_engine, create_config, has_cuda_gpu
from graphprune.tensorrt.logs import capturing_logger
from graphprune.tensorrt.profiles import parse_shapes
from graphprune.tensorrt.run import run_engine
from tests.conftest import MiniLM
from tests.onnx_builders import init, make_model, tensor
from tests.tensorrt_models import llama_decoder

trt = pytest.importorskip(
    "tensorrt_rtx_bindings", reason="TensorRT-RTX not installed: pip install -e '.[trt-rtx]'"
)
pytestmark = pytest.mark.tensorrt

MINILM_SHAPES = ["input_ids:1x8,8x128,32x256", "attention_mask:1x8,8x128,32x256"]
DECODER_SHAPES = ["input_ids:1x1,4x64,8x256"]


def cli(*args: object) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args], terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


def prune_and_halve(source: Path, folder: Path) -> Path:
    """What the quickstart does: ``apply --nm 2:4`` then ``convert --fp16``."""
    cli("apply", source, "--nm", "2:4", "-o", folder / "model.pruned.onnx")
    cli("convert", folder / "model.pruned.onnx", "--fp16", "-o", folder / "model.fp16.onnx")
    return folder / "model.fp16.onnx"


@pytest.fixture(scope="module")
def decoder_fp32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("decoder") / "decoder.onnx"
    onnx.save_model(llama_decoder(), str(path))
    return path


@pytest.fixture(scope="module")
def decoder_fp16(decoder_fp32: Path) -> Path:
    return prune_and_halve(decoder_fp32, decoder_fp32.parent)


@pytest.fixture(scope="module")
def minilm_fp16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prune_and_halve(demo.minilm_l3(), tmp_path_factory.mktemp("minilm"))


# --- independent witnesses -----------------------------------------------------------------------------------


def parser_supported_nodes(model_path: Path) -> list[int]:
    """Node indices the real ONNX parser says it supports (its own query, separate from the build's parse)."""
    logger = trt.Logger(trt.Logger.ERROR)
    network = trt.Builder(logger).create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.supports_model_v2(model_path.read_bytes(), str(model_path))
    nodes: list[int] = []
    for i in range(parser.num_subgraphs):
        if parser.is_subgraph_supported(i):
            nodes += parser.get_subgraph_nodes(i)
    return sorted(nodes)


def header_diagnostics(engine: bytes) -> set[str]:
    """The runtime's verdict on an engine header, which it reads without a GPU."""
    runtime = trt.Runtime(capturing_logger(trt))  # silent: without a GPU the runtime logs a fatal-looking line
    _, flags = runtime.get_engine_validity(engine[: runtime.engine_header_size])
    return {name for name, bit in trt.EngineInvalidityDiagnostics.__members__.items() if int(flags) & int(bit)}


def sparse_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of MatMul nodes whose constant B is 2:4 along K (axis 0 of ``[K, N]``), checked with numpy."""
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    names = []
    for node in model.graph.node:
        w = weights.get(node.input[1]) if node.op_type == "MatMul" else None
        if w is not None and w.ndim == 2 and w.shape[0] % 4 == 0:
            nonzero = (w.reshape(w.shape[0] // 4, 4, w.shape[1]) != 0).sum(axis=1)
            if nonzero.max() <= 2:
                names.append(node.name)
    return names


def check_report_against_sources(report: dict, model_path: Path, engine_path: Path, shapes: list[str]) -> None:
    model = onnx.load_model(str(model_path))
    engine = engine_path.read_bytes()
    # The parser accepted every node of the file.
    assert parser_supported_nodes(model_path) == list(range(len(model.graph.node)))
    assert report["parser"]["onnx_nodes"] == len(model.graph.node) and report["parser"]["network_layers"] > 0
    # The engine serialized, holds the weights, and its header reads as well-formed (a corrupted one does not).
    weight_bytes = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    assert report["engine_bytes"] == len(engine) >= weight_bytes
    assert not header_diagnostics(engine) & {"MALFORMED_ENGINE", "VERSION_MISMATCH"}
    assert "MALFORMED_ENGINE" in header_diagnostics(b"\0" * 64 + engine[64:])
    # Backend, version, profiles: as installed and as asked, and as the engine's own I/O description says.
    assert (report["backend"], report["product"]) == ("tensorrt-rtx", "TensorRT-RTX")
    assert report["version"] == importlib.metadata.version("tensorrt-rtx-cu12-bindings") == trt.__version__
    asked = {name: r.as_dict() for name, r in parse_shapes(shapes).items()}
    assert report["profiles"] == [asked]
    engine_inputs = {t["name"]: list(t["profiles"]) for t in report["engine_io"] if t["mode"] == "Input"}
    assert engine_inputs == {name: [r] for name, r in asked.items()}
    assert report["flags"] == ["SPARSE_WEIGHTS"] and report["strongly_typed"]
    # Every 2:4 MatMul of the file is in an engine layer (the builder's layer list names the ONNX nodes it holds):
    # the list is the engine's, not a guess; TensorRT-RTX gives these layers no tactic yet (see BENCHMARKS.md).
    origins = {o for layer in report["layers"] for o in layer["origin"].split("\x1f")}
    pruned = sparse_matmuls(model)
    assert pruned and {f"[ONNX Layer: {name}]" for name in pruned} <= origins
    # Sparsity: nothing claimed beyond the log lines and tactic names the report carries.
    facts = report["sparsity"]
    assert facts["flag"]
    named_in_lines = " ".join(facts["lines"])
    assert all(layer in named_in_lines for layer in facts["eligible_layers"] + facts["sparse_layers"])
    assert facts["sparse_tactic_layers"] == [
        layer["name"] for layer in report["layers"] if "sparse" in layer["tactic"].lower()
    ]
    if not facts["lines"] and not facts["sparse_tactic_layers"]:
        assert facts["verdict"].startswith("the TensorRT-RTX builder logged no (Sparsity) line")
        assert "not known at build time" in facts["verdict"]


# --- real builds -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_quickstart_minilm_builds_a_real_engine(minilm_fp16: Path) -> None:
    engine = minilm_fp16.with_name("minilm.engine")
    shape_args = [arg for spec in MINILM_SHAPES for arg in ("--shapes", spec)]
    output = cli("build", minilm_fp16, "-o", engine, "--backend", "tensorrt-rtx", *shape_args)
    report = json.loads(engine.with_name("minilm.engine.json").read_text())
    check_report_against_sources(report, minilm_fp16, engine, MINILM_SHAPES)
    assert report["precision"] == "fp16" and report["warnings"] == []
    assert "warning" not in output
    assert f"sparsity: {report['sparsity']['verdict']}" in " ".join(output.split())
    assert f"wrote {engine}" in output and "TensorRT-RTX" in output


def test_decoder_builds_with_profile_and_workspace(decoder_fp16: Path) -> None:
    engine, cache = decoder_fp16.with_name("decoder.engine"), decoder_fp16.with_name("timing.cache")
    report = build_engine(
        decoder_fp16, engine, shapes=DECODER_SHAPES, timing_cache=cache, workspace_gb=1, backend="tensorrt-rtx"
    )
    saved = json.loads(engine.with_name("decoder.engine.json").read_text())
    assert saved["build_seconds"] == report.build_seconds > 0
    check_report_against_sources(saved, decoder_fp16, engine, DECODER_SHAPES)
    assert saved["warnings"] == [f"TensorRT-RTX has no timing cache (its cache calls are no-ops): {cache} ignored"]
    assert not cache.exists()
    logits = next(t for t in saved["engine_io"] if t["name"] == "logits")
    assert (logits["mode"], logits["dims"]) == ("Output", [-1, -1, 256])


def test_create_config_sets_the_real_builder_options() -> None:
    loaded = load_backend("tensorrt-rtx")
    builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    ranges = parse_shapes(DECODER_SHAPES)
    config = create_config(loaded, builder, ["SPARSE_WEIGHTS"], ranges, workspace_gb=2)
    assert config.get_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    assert config.get_memory_pool_limit(trt.MemoryPoolType.WORKSPACE) == 2 << 30
    assert config.profiling_verbosity == trt.ProfilingVerbosity.DETAILED
    assert config.num_optimization_profiles == 1


def test_fp32_model_builds_with_one_line_warning(decoder_fp32: Path) -> None:
    engine = decoder_fp32.with_name("fp32.engine")
    output = cli("build", decoder_fp32, "-o", engine, "--backend", "tensorrt-rtx", "--shapes", DECODER_SHAPES[0])
    warnings = [line for line in output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1
    assert "sparse tensor cores need FP16, BF16 or INT8" in warnings[0]
    assert f"convert {decoder_fp32.name} to FP16 first (`graphprune convert`" in warnings[0]
    report = json.loads(engine.with_name("fp32.engine.json").read_text())
    assert report["precision"] == "fp32" and len(report["warnings"]) == 1
    assert engine.stat().st_size == report["engine_bytes"] > 0


# --- bad input: one line, exit 2, nothing written ----------------------------------------------------------------


def static_model() -> onnx.ModelProto:
    """``y = x @ w`` with ``x: [b, 8]``: one dynamic and one fixed dimension."""
    w = np.eye(8, dtype=np.float16)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    return make_model(
        [node],
        [tensor("x", TensorProto.FLOAT16, ["b", 8])],
        [tensor("y", TensorProto.FLOAT16, ["b", 8])],
        [init(w, "w")],
    )


def unknown_op_model() -> onnx.ModelProto:
    node = helper.make_node("FrobnicateNotAnOp", ["x"], ["y"], name="the_bad_node")
    return make_model(
        [node], [tensor("x", TensorProto.FLOAT16, [2, 8])], [tensor("y", TensorProto.FLOAT16, [2, 8])]
    )


@pytest.mark.parametrize(
    ("model", "args", "message"),
    [
        ("junk", ["--shapes", "x:1x8,1x8,1x8"], "not an ONNX model"),
        ("static", ["--shapes", "nope:1x8,2x8,4x8"], "'nope', not an input of the model"),
        ("static", ["--shapes", "x:1x16,2x16,4x16"], "dimension 1 is fixed to 8 in the model"),
        ("static", ["--shapes", "x:1,2,4"], "rank 1, but the input has rank 2"),
        ("static", [], "'x' has dynamic dimensions"),
        ("static", ["--shapes", "x:1x8,2x8,4x8", "-o", "{tmp}/file/m.engine"], "cannot write"),
        ("static", ["--shapes", "x:1x8,2x8,4x8", "-o", "{tmp}/m.onnx"], "is the input model"),
        ("unknown_op", [], "could not parse"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    tmp_path: Path, model: str, args: list[str], message: str
) -> None:
    source = tmp_path / "m.onnx"
    if model == "junk":
        source.write_bytes(b"this is not a protobuf \xff\xfe")
    else:
        onnx.save_model(static_model() if model == "static" else unknown_op_model(), str(source))
    (tmp_path / "file").write_bytes(b"a file, not a folder")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = [] if "-o" in args else ["-o", str(tmp_path / "m.engine")]
    result = CliRunner().invoke(app, ["build", str(source), *out, "--backend", "tensorrt-rtx", *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
    if model == "unknown_op":
        assert "'the_bad_node' (FrobnicateNotAnOp)" in lines[0]
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}
    assert after == before  # no engine, no report, no temporary; the input untouched


# --- on a GPU (none in this project's CI: skipped there) ---------------------------------------------------


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not has_cuda_gpu(), reason="no CUDA GPU: TensorRT-RTX engines are built here, not run")
def test_minilm_engine_matches_onnxruntime_fp16_on_a_gpu(minilm_fp16: Path, minilm: MiniLM) -> None:
    pytest.importorskip("torch")
    engine = minilm_fp16.with_name("gpu.engine")
    report = build_engine(minilm_fp16, engine, shapes=MINILM_SHAPES, backend="tensorrt-rtx", force=True)
    assert report.layers_source == "engine inspector" and all(layer["tactic"] for layer in report.layers)
    feeds = {name: values[:8] for name, values in minilm.heldout_feeds.items()}  # 8 x 128: the OPT shape
    session = onnxruntime.InferenceSession(str(minilm_fp16), providers=["CPUExecutionProvider"])
    (reference,) = session.run([minilm.embedding_output], feeds)
    ours = run_engine(engine, feeds, backend="tensorrt-rtx")[minilm.embedding_output].astype(np.float64)
    cosine = (ours * reference).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1))
    assert cosine.min() >= 0.999, cosine


def test_build_json_prints_the_report_it_saves(tmp_path: Path) -> None:
    source = tmp_path / "m.onnx"
    onnx.save_model(static_model(), str(source))
    engine = tmp_path / "m.engine"
    args = ["build", str(source), "-o", str(engine), "--backend", "tensorrt-rtx", "--json"]
    result = CliRunner().invoke(app, [*args, "--shapes", "x:1x8,2x8,4x8"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == json.loads((tmp_path / "m.engine.json").read_text())
    assert printed["engine_bytes"] == engine.stat().st_size > 0
