"""int8 and fp8 2:4 models from graphprune quantize build with TensorRT-RTX (strongly typed, on the CPU), and eval
reads quantized models.

The engine's layer list is the builder's own: every quantized MatMul sits in a gemm layer whose ONNX origin holds
its weight's DequantizeLinear and its activation's DequantizeLinear, i.e. the builder fused the Q/DQ pair into
the matrix multiplication (an int8 or fp8 layer) rather than dequantizing to float in front of it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from graphprune.calibration.request import CalibrationRequest
from graphprune.cli import app
from graphprune.quantize.config import QuantizeConfig
from graphprune.quantize.files import quantize_file
from tests.onnx_builders import run
from tests.tensorrt_models import DecoderShape, llama_decoder

SHAPES = ["input_ids:1x1,4x64,8x256"]


def cli(*args: object) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args], terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("decoder")
    onnx.save(llama_decoder(), folder / "decoder.onnx")
    cli("apply", folder / "decoder.onnx", "--nm", "2:4", "-o", folder / "pruned.onnx")
    return folder / "pruned.onnx"


@pytest.mark.tensorrt
@pytest.mark.parametrize(("precision", "label"), [("int8", "int8-qdq"), ("fp8", "fp8-qdq")])
def test_quantized_24_model_builds_strongly_typed(pruned: Path, precision: str, label: str) -> None:
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX not installed")
    model = pruned.with_name(f"{precision}.onnx")
    cli("quantize", pruned, "--precision", precision, "--shape", "input_ids=1x16", "-o", model)
    cli("check", model)  # 2:4 still holds on the codes
    engine = model.with_suffix(".engine")
    cli("build", model, "-o", engine, "--backend", "tensorrt-rtx", *[a for s in SHAPES for a in ("--shapes", s)])
    report = json.loads(engine.with_name(engine.name + ".json").read_text())
    assert report["precision"] == label and report["strongly_typed"]
    quantized = json.loads(model.with_name(f"{precision}.report.json").read_text())["weights"]
    graph = onnx.load(model).graph
    dq_of = {n.input[0]: n.name for n in graph.node if n.op_type == "DequantizeLinear"}
    gemms = [layer["origin"] for layer in report["layers"] if layer["layer_type"] == "gemm"]
    for weight in quantized:
        fused = [o for o in gemms if f"[ONNX Layer: {dq_of[weight['name']]}]" in o]
        assert len(fused) == 1, weight["name"]
        activation_dq = [
            part for part in fused[0].split("\x1f") if "DequantizeLinear" in part and "weight" not in part
        ]
        assert activation_dq, fused[0]


@pytest.mark.tensorrt
def test_int4_blocks_that_do_not_tile_k_build(tmp_path: Path) -> None:
    """hidden 192 and MLP 320 against blocks of 128: TensorRT reads a block as K / scale entries and refuses a
    scale that does not tile K, so the TensorRT target writes blocks of gcd(K, 128) with repeated scales."""
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX not installed")
    onnx.save(llama_decoder(DecoderShape(hidden=192, mlp=320)), tmp_path / "decoder.onnx")
    cli("apply", tmp_path / "decoder.onnx", "--nm", "2:4", "-o", tmp_path / "pruned.onnx")
    model = tmp_path / "int4.onnx"
    cli("quantize", tmp_path / "pruned.onnx", "--precision", "int4", "--block-size", "128", "-o", model)
    weights = json.loads((tmp_path / "int4.report.json").read_text())["weights"]
    assert len(weights) == 14  # every projection but the head: none left float for its K
    graph = onnx.load(model).graph
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    blocks = {}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in {w["name"] for w in weights}:
            k = shapes[node.input[0]][0]
            block = next(a.i for a in node.attribute if a.name == "block_size")
            assert shapes[node.input[1]][0] * block == k  # whole blocks
            blocks[k] = block
    assert blocks == {192: 64, 320: 64}
    engine = model.with_suffix(".engine")
    cli("build", model, "-o", engine, "--backend", "tensorrt-rtx", *[a for s in SHAPES for a in ("--shapes", s)])
    layers = json.loads(engine.with_name(engine.name + ".json").read_text())["layers"]
    assert sum(layer["precision"] == "int4" for layer in layers) >= 7


def test_eval_reads_quantized_models(pruned: Path, tmp_path: Path) -> None:
    ids = np.random.default_rng(0).integers(0, 256, (4, 1, 16)).astype(np.int64)
    request = CalibrationRequest(data={"input_ids": ids.reshape(4, 16)})
    out, _ = quantize_file(pruned, QuantizeConfig(precision="int8"), tmp_path / "q.onnx", request, force=True)
    np.savez(tmp_path / "held.npz", input_ids=ids.reshape(4, 16))
    output = cli("eval", pruned, out, "--calib", tmp_path / "held.npz", "--json")
    got = json.loads(output)
    a = np.concatenate([run(onnx.load(pruned), {"input_ids": i})[0].ravel() for i in ids])
    b = np.concatenate([run(onnx.load(out), {"input_ids": i})[0].ravel() for i in ids])
    cosine = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert 0.9 < cosine < 1.0
    assert abs(got["outputs"][0]["cosine"] - cosine) < 1e-3, got
