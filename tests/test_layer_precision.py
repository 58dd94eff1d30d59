"""`build` names the precision of each engine layer from its ONNX origin, and says when kernels are chosen.

The unit test labels hand-made layers of a hand-made model; the TensorRT-RTX test builds the joint mode's int8 2:4
model of a small decoder (`apply --method sparsegpt --quantize int8`) on this CPU and checks every layer's label
against what the ONNX file itself says about the nodes the layer names.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from graphprune.cli import app
from graphprune.tensorrt.layer_precision import PrecisionIndex, onnx_origins, precision_note, with_precisions
from graphprune.tensorrt.logs import LayerInfo
from tests.onnx_builders import make_model, tensor
from tests.tensorrt_models import llama_decoder


def layer(*nodes: str) -> LayerInfo:
    origin = "\x1f".join(f"[ONNX Layer: {n}]" for n in nodes)
    return LayerInfo(name="l", layer_type="gemm", tactic="", sparse_tactic=False, origin=origin)


def quantized_model() -> onnx.ModelProto:
    """x → MatMul(DQ(int8 W8)) → Cast fp16 → MatMul(DQ(int4 W4, blocked)) in fp16."""
    w8 = numpy_helper.from_array(np.ones((4, 4), np.int8), "w8")
    w4 = helper.make_tensor("w4", TensorProto.INT4, [4, 4], np.ones(16, np.int8).tolist())
    scales = [
        numpy_helper.from_array(np.ones(4, np.float32), "s8"),
        numpy_helper.from_array(np.ones((2, 4), np.float16), "s4"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["w8", "s8"], ["w8f"], name="dq8", axis=1),
        helper.make_node("MatMul", ["x", "w8f"], ["a"], name="mm8"),
        helper.make_node("Cast", ["a"], ["ah"], name="to16", to=TensorProto.FLOAT16),
        helper.make_node("DequantizeLinear", ["w4", "s4"], ["w4h"], name="dq4", axis=0, block_size=2),
        helper.make_node("MatMul", ["ah", "w4h"], ["y"], name="mm4"),
    ]
    outputs = [tensor("y", TensorProto.FLOAT16, ["b", 4])]
    return make_model(nodes, [tensor("x", shape=["b", 4])], outputs, [w8, w4, *scales], opset=21)


def test_layers_are_labelled_from_their_onnx_origin() -> None:
    model = quantized_model()
    index = PrecisionIndex(model)
    assert index.of(layer("mm8", "dq8")) == ("int8", "weight DequantizeLinear of w8")
    assert index.of(layer("mm4", "dq4"))[0] == "int4"
    assert index.of(layer("mm8", "dq8", "mm4", "dq4"))[0] == "int4+int8"
    assert index.of(layer("to16")) == ("float16", "output types of its ONNX nodes")
    assert index.of(layer("mm8")) == ("float32", "output types of its ONNX nodes")
    assert index.of(layer("to16", "mm8"))[0] == "float16+float32"
    assert index.of(layer()) == ("", "no ONNX origin")
    assert index.of(layer("not_a_node"))[0] == ""
    labelled = with_precisions(model, [layer("mm8", "dq8")])
    assert labelled[0].precision == "int8" and labelled[0].origin == layer("mm8", "dq8").origin
    assert onnx_origins(layer("a b", "c").origin) == ["a b", "c"]
    assert "load time" in precision_note("TensorRT-RTX", True)
    assert "load time" not in precision_note("TensorRT", False)


@pytest.mark.tensorrt
def test_rtx_build_report_names_each_layers_precision(tmp_path: Path) -> None:
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX not installed")
    runner = CliRunner()

    def cli(*args: object) -> str:
        result = runner.invoke(app, [str(a) for a in args], terminal_width=400)
        assert result.exit_code == 0, result.output
        return result.output

    onnx.save(llama_decoder(), tmp_path / "decoder.onnx")
    ids = np.random.default_rng(1810).integers(0, 256, (8, 16)).astype(np.int64)
    np.savez(tmp_path / "calib.npz", input_ids=ids)
    model = tmp_path / "joint.onnx"
    cli(
        "apply", tmp_path / "decoder.onnx", "--nm", "2:4", "--method", "sparsegpt", "--quantize", "int8",
        "--calib", tmp_path / "calib.npz", "-o", model,
    )  # fmt: skip
    cli("check", model)
    engine = tmp_path / "joint.engine"
    output = cli("build", model, "-o", engine, "--backend", "tensorrt-rtx", "--shapes", "input_ids:1x1,4x64,8x256")
    report = json.loads(engine.with_name(engine.name + ".json").read_text())

    # the ONNX file's own word: which nodes dequantize an int8 weight, and that every float is float32
    graph = onnx.load(model).graph
    int8 = {t.name for t in graph.initializer if t.data_type == TensorProto.INT8}
    weight_dq = {n.name for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int8}
    assert len(weight_dq) == 14  # every projection but the LM head
    labels = []
    for entry in report["layers"]:
        names = onnx_origins(entry["origin"])
        expected = "int8" if weight_dq & set(names) else "float32" if names else ""
        assert entry["precision"] == expected, entry
        labels.append(entry["precision"])
    gemms = [e for e in report["layers"] if e["layer_type"] == "gemm"]
    assert sum(e["precision"] == "int8" for e in gemms) >= 7  # q/k/v, o, gate/up, down of each block (fused)
    assert any(e["precision"] == "float32" for e in gemms)  # attention scores and the float LM head
    assert "load time" in report["layer_precision_note"]
    assert f"{labels.count('int8')} int8" in output and "load time" in output
