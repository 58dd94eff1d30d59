"""check reads every quantized form: our Q/DQ (int8, fp8, int4 packed) and ONNX Runtime's quantizers' operators.

A 2:4 model quantized each way must pass the 2:4 check with every weight read (a zero is a code equal to its zero
point); the same model with one group broken must fail at that weight; and a check that read no weight fails.
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
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
from typer.testing import CliRunner

from graphprune.algorithms.pattern import NMPattern
from graphprune.cli import app
from graphprune.graph.model_io import load_model
from graphprune.pipeline.files import check_file
from graphprune.quantize.config import QuantizeConfig
from graphprune.quantize.files import quantize_file
from graphprune.tensorrt.eligibility import eligibility_report
from tests.onnx_builders import init, make_model, reference_nm_mask, tensor

K, N = 64, 32
PATTERN = NMPattern(2, 4)


def model(broken: bool = False) -> onnx.ModelProto:
    """x @ W1 -> Relu -> @ W2 (both 2:4 along K; with ``broken``, W1's first group keeps 4) -> @ head."""
    rng = np.random.default_rng(9)
    ws = []
    for shape in ((K, N), (N, K)):
        w = rng.standard_normal(shape).astype(np.float32)
        ws.append(w * reference_nm_mask(w, 0, 2, 4))
    if broken:
        ws[0][:4, 0] = [0.5, -0.7, 0.9, 1.1]
    head = rng.standard_normal((K, 8)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["a"], name="fc1"),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["b"], name="fc2"),
        helper.make_node("MatMul", ["b", "head"], ["y"], name="head"),
    ]
    m = make_model(
        nodes,
        [tensor("x", shape=[4, K])],
        [tensor("y", shape=[4, 8])],
        [init(ws[0], "W1"), init(ws[1], "W2"), init(head, "head")],
        opset=21,
    )
    m.ir_version = 10
    return m


class Reader(CalibrationDataReader):
    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.feeds = iter([{"x": rng.standard_normal((4, K)).astype(np.float32)} for _ in range(4)])

    def get_next(self) -> dict | None:
        return next(self.feeds, None)


def ours(precision: str):  # type: ignore[no-untyped-def]
    def write(src: Path, dst: Path) -> None:
        quantize_file(src, QuantizeConfig(precision=precision, block_size=32), dst, force=True)  # type: ignore[arg-type]

    return write


def ort_dynamic(src: Path, dst: Path) -> None:
    quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8)


def ort_qoperator(src: Path, dst: Path) -> None:
    quantize_static(src, dst, Reader(), quant_format=QuantFormat.QOperator, per_channel=False)


def ort_nbits(src: Path, dst: Path) -> None:
    quantizer = MatMulNBitsQuantizer(onnx.load(src), block_size=32, is_symmetric=False)
    quantizer.process()
    onnx.save(quantizer.model.model, dst)


FORMS = {
    "int8 Q/DQ": (ours("int8"), "DequantizeLinear", "int8-qdq"),
    "fp8 Q/DQ": (ours("fp8"), "DequantizeLinear", "fp8-qdq"),
    "int4 Q/DQ": (ours("int4"), "DequantizeLinear", "int4-qdq"),
    "MatMulInteger": (ort_dynamic, "MatMulInteger", None),
    "QLinearMatMul": (ort_qoperator, "QLinearMatMul", None),
    "MatMulNBits": (ort_nbits, "MatMulNBits", None),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_check_reads_each_quantized_form(tmp_path: Path, form: str) -> None:
    write, op, precision = FORMS[form]
    for broken in (False, True):
        src, dst = tmp_path / f"in{broken}.onnx", tmp_path / f"out{broken}.onnx"
        onnx.save(model(broken), src)
        write(src, dst)
        assert op in {n.op_type for n in onnx.load(dst).graph.node}
        result = check_file(dst, PATTERN)
        assert {w.name.split("_")[0] for w in result.weights} >= {"W1", "W2"}, result.skipped
        bad = {w.name.split("_")[0] for w in result.violations}
        assert bad == ({"W1"} if broken else set()), result.weights
        assert result.ok is not broken
    if precision is not None:
        loaded = load_model(tmp_path / "outFalse.onnx")
        records = {r.name: r for r in eligibility_report(loaded, min_channels=1)}
        assert records["W1"].precision == precision
        assert (records["W1"].status == "eligible") is (precision != "int4-qdq"), records["W1"].reasons


def test_a_check_that_read_no_weight_fails(tmp_path: Path) -> None:
    node = helper.make_node("Relu", ["x"], ["y"])
    onnx.save(make_model([node], [tensor("x", shape=[4, K])], [tensor("y", shape=[4, K])]), tmp_path / "m.onnx")
    result = CliRunner().invoke(app, ["check", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1 and "no weight could be read" in result.output
