"""Models TensorRT cannot parse (ONNX Runtime's integer quantization, its contrib ops) get a reason to act on.

The quantized models come from ONNX Runtime's own quantizer on a tiny float model; where TensorRT-RTX is installed,
its real parser confirms that it rejects exactly those files and accepts the float original.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from typer.testing import CliRunner

from graphprune.cli import app
from graphprune.errors import GraphpruneError
from graphprune.tensorrt.parsable import check_parsable
from tests.onnx_builders import init, make_model, tensor


def float_model(path: Path) -> Path:
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"])]
    weight = rng.standard_normal((64, 64)).astype(np.float32)
    model = make_model(nodes, [tensor("x", shape=["b", 64])], [tensor("y", shape=["b", 64])], [init(weight, "w")])
    onnx.save_model(model, str(path))
    return path


class _Batches(CalibrationDataReader):
    def __init__(self) -> None:
        rng = np.random.default_rng(1)
        self.batches = iter([{"x": rng.standard_normal((2, 64)).astype(np.float32)} for _ in range(2)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    source = float_model(tmp_path / "model.onnx")
    dynamic, qoperator = tmp_path / "model.dynamic.onnx", tmp_path / "model.qop.onnx"
    quantize_dynamic(str(source), str(dynamic), weight_type=QuantType.QInt8)
    quantize_static(str(source), str(qoperator), _Batches(), quant_format=QuantFormat.QOperator)
    return {"float": source, "dynamic": dynamic, "qoperator": qoperator}


def test_ort_quantized_models_are_named_with_what_to_build_instead(models: dict[str, Path]) -> None:
    check_parsable(onnx.load_model(str(models["float"])), "model.onnx")  # the float original passes
    expected = {"dynamic": "DynamicQuantizeLinear, MatMulInteger", "qoperator": "QLinearMatMul"}
    for kind, ops in expected.items():
        model = onnx.load_model(str(models[kind]))
        assert ops.split(", ")[0] in {n.op_type for n in model.graph.node}  # what ONNX Runtime wrote
        with pytest.raises(GraphpruneError, match="TensorRT reads Q/DQ quantization only") as error:
            check_parsable(model, models[kind].name)
        message = str(error.value)
        assert "\n" not in message and ops in message and "float model" in message


def test_onnx_runtime_contrib_ops_are_named() -> None:
    node = helper.make_node("FusedMatMul", ["x", "w"], ["y"], domain="com.microsoft", alpha=1.0)
    model = make_model(
        [node], [tensor("x", shape=[2, 4])], [tensor("y", shape=[2, 4])], [init(np.eye(4, dtype=np.float32), "w")]
    )
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    with pytest.raises(
        GraphpruneError, match=r"ONNX Runtime's own operators \(FusedMatMul, domain com.microsoft\)"
    ):
        check_parsable(model, "m.onnx")


@pytest.mark.tensorrt
def test_build_says_why_and_the_real_parser_agrees(models: dict[str, Path], tmp_path: Path) -> None:
    trt = pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX not installed")

    def parses(path: Path) -> bool:
        logger = trt.Logger(trt.Logger.ERROR)
        network = trt.Builder(logger).create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        return bool(trt.OnnxParser(network, logger).parse_from_file(str(path)))

    assert parses(models["float"])
    for kind in ("dynamic", "qoperator"):
        assert not parses(models[kind])  # the check refuses nothing the parser would read
        engine = tmp_path / f"{kind}.engine"
        result = CliRunner().invoke(app, ["build", str(models[kind]), "-o", str(engine), "--shapes", "x:1x64"])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and "TensorRT reads Q/DQ quantization only" in lines[0]
        assert not engine.exists()
