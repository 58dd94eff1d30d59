"""Attention's activation x activation MatMuls through Q/DQ, and the softmax NaN guard moved past probs·V.

The model is the shape PyTorch's exporter writes for ``scaled_dot_product_attention``: scores = Q·Kᵀ·scale + an
additive mask (0 or -inf), ``p = Softmax``, ``Where(IsNaN(p), 0, p)`` @ V. References: the float model's own
tensors fetched from ONNX Runtime (calibrated ranges), numpy's Q/DQ arithmetic, and ONNX Runtime running the
model before and after a rewrite.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper
from typer.testing import CliRunner

from graphprune.calibration.request import CalibrationRequest
from graphprune.cli.app import app
from graphprune.graph.model_io import load_model
from graphprune.quantize.config import QuantizeConfig
from graphprune.quantize.files import quantize_file
from graphprune.quantize.gelu import reorder_erf_gelus
from graphprune.quantize.guards import move_nan_guards
from tests.onnx_builders import init, make_model, run, tensor

B, S, D, H, HD = 2, 6, 8, 2, 4  # batch, tokens, model width, heads, head width
BMM_OPERANDS = ("q", "kt", "z")  # Q, Kᵀ and the guarded probabilities


def exported_attention(seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    """x + O(Where(IsNaN(p), 0, p) @ V), p = Softmax(Q Kᵀ / √hd + mask): the exporter's SDPA pattern."""
    rng = np.random.default_rng(seed)
    w = {n: (rng.standard_normal((D, D)) * 0.5).astype(np.float32) for n in ("wq", "wk", "wv", "wo")}
    consts = {
        "split": np.array([0, 0, H, HD], np.int64),
        "merge": np.array([0, 0, D], np.int64),
        "scale": np.array(1 / np.sqrt(HD), np.float32),
        "zero": np.array(0.0, np.float32),
    }
    nodes = [helper.make_node("MatMul", ["x", w], [f"{w}_out"], name=f"{w}_proj") for w in ("wq", "wk", "wv")]
    for t, w_name in (("q", "wq"), ("k", "wk"), ("v", "wv")):
        nodes += [
            helper.make_node("Reshape", [f"{w_name}_out", "split"], [f"{t}4"]),
            helper.make_node("Transpose", [f"{t}4"], [f"{t}_heads"], perm=[0, 2, 1, 3]),
        ]
    nodes += [
        helper.make_node("Mul", ["q_heads", "scale"], ["q"]),
        helper.make_node("Transpose", ["k_heads"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["s0"], name="bmm1"),
        helper.make_node("Add", ["s0", "mask"], ["s"]),
        helper.make_node("Softmax", ["s"], ["p"], axis=-1),
        helper.make_node("IsNaN", ["p"], ["p_nan"]),
        helper.make_node("Where", ["p_nan", "zero", "p"], ["z"]),
        helper.make_node("MatMul", ["z", "v_heads"], ["a0"], name="bmm2"),
        helper.make_node("Transpose", ["a0"], ["a1"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["a1", "merge"], ["a"]),
        helper.make_node("MatMul", ["a", "wo"], ["o"], name="wo_proj"),
        helper.make_node("Add", ["x", "o"], ["y"]),
    ]
    inits = [init(v, k) for k, v in {**w, **consts}.items()]
    inputs = [tensor("x", shape=["b", S, D]), tensor("mask", shape=["b", 1, S, S])]
    return make_model(nodes, inputs, [tensor("y", shape=["b", S, D])], inits, opset=opset)


def padding_mask(keep: np.ndarray) -> np.ndarray:
    """Additive key-padding mask ``[b, 1, S, S]`` from ``keep`` ``[b, S]`` (0 kept, -inf padded)."""
    return np.broadcast_to(np.where(keep[:, None, None, :], 0.0, -np.inf), (len(keep), 1, S, S)).astype(np.float32)


def feeds(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    keep = rng.random((n, S)) > 0.3
    keep[0] = False  # one sample with every key masked: NaN probabilities, the guard's case
    return {"x": rng.standard_normal((n, S, D)).astype(np.float32), "mask": padding_mask(keep)}


def with_outputs(model: onnx.ModelProto | ir.Model, names: tuple[str, ...]) -> onnx.ModelProto:
    proto = (
        ir.to_proto(model)
        if isinstance(model, ir.Model)
        else onnx.ModelProto.FromString(model.SerializeToString())
    )
    proto.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    return proto


def quantize(tmp_path: Path, calib: dict[str, np.ndarray], **options: object) -> tuple[Path, dict]:
    src = tmp_path / "model.onnx"
    onnx.save(exported_attention(), src)
    config = QuantizeConfig(precision="int8", include_head=True, **options)  # type: ignore[arg-type]
    out, report = quantize_file(src, config, tmp_path / "q.onnx", CalibrationRequest(data=calib), force=True)
    return out, report.to_dict()


def fake_quant(x: np.ndarray, scale: float, zero: float, lo: int, hi: int) -> np.ndarray:
    return ((np.clip(np.rint(x / np.float32(scale)) + zero, lo, hi) - zero) * np.float32(scale)).astype(np.float32)


@pytest.mark.parametrize("target", ["tensorrt", "ort"])
def test_both_bmms_match_numpy_qdq_with_calibrated_and_softmax_ranges(tmp_path: Path, target: str) -> None:
    rng = np.random.default_rng(1800)  # this function's own data, whatever ran before
    calib = feeds(rng, 16)
    out, report = quantize(tmp_path, calib, target=target, bmm=True)
    matmuls = report["activation_matmuls"]
    assert len(matmuls) == 2
    # ranges: Q and Kᵀ measured on the calibration data in the float model; the probabilities are [0, 1]
    float_q, float_kt = run(with_outputs(exported_attention(), ("q", "kt")), calib)[1:]
    by_node = {m["node"]: m["operands"] for m in matmuls}
    q_rec, kt_rec = by_node["bmm1"]
    p_rec = by_node["bmm2"][0]
    for rec, values in ((q_rec, float_q), (kt_rec, float_kt)):
        np.testing.assert_allclose([rec["low"], rec["high"]], [values.min(), values.max()], rtol=1e-6)
    assert (p_rec["low"], p_rec["high"]) == (0.0, 1.0)
    if target == "tensorrt":  # symmetric int8 on both operands of both MatMuls
        grids = [(rec["scale"], 0.0, -128, 127) for rec in (q_rec, kt_rec, p_rec)]
        assert grids[0][0] == pytest.approx(max(abs(q_rec["low"]), abs(q_rec["high"])) / 127, rel=1e-6)
        assert p_rec["scale"] == pytest.approx(1 / 127, rel=1e-6)
    else:  # uint8, the range widened to hold 0; probabilities at zero point 0, step 1/255
        grids = [(rec["scale"], rec["zero_point"], 0, 255) for rec in (q_rec, kt_rec, p_rec)]
        assert p_rec["scale"] == pytest.approx(1 / 255, rel=1e-6) and p_rec["zero_point"] == 0
    assert all(op["zero_point"] == 0 for m in matmuls for op in m["operands"]) == (target == "tensorrt")
    # each MatMul's output against numpy's Q/DQ arithmetic on the operands (ONNX Runtime's reference kernels)
    x = feeds(rng, 4)
    q, kt, v, p, s0, a0 = run(with_outputs(onnx.load(out), ("q", "kt", "v_heads", "p", "s0", "a0")), x)[1:]
    want_s0 = fake_quant(q, *grids[0]) @ fake_quant(kt, *grids[1])
    np.testing.assert_allclose(s0, want_s0, rtol=1e-5, atol=1e-5)
    rows = ~np.isnan(p).any(axis=-1, keepdims=True)  # a fully masked sample's rows are zeroed by the guard
    _, v_rec = by_node["bmm2"]
    want_a0 = fake_quant(np.where(rows, p, 0), *grids[2]) @ fake_quant(v, *_grid_of(v_rec, target))
    np.testing.assert_allclose(np.where(rows, a0, 0), want_a0, rtol=1e-5, atol=1e-5)
    assert np.abs(s0 - q @ kt).max() > 1e-4  # quantized, not the float product
    # the optimised session (integer kernels; the v projection requantized in one step) computes the same model
    y = run(onnx.load(out), x)[0]
    fused = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert np.abs(fused - y).max() < 0.05 * np.abs(y).max()


def _grid_of(rec: dict, target: str) -> tuple[float, float, int, int]:
    return (rec["scale"], 0.0, -128, 127) if target == "tensorrt" else (rec["scale"], rec["zero_point"], 0, 255)


def optimised_ops(path: Path, tmp_path: Path) -> list[str]:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]


@pytest.mark.parametrize("bmm", [True, False])
def test_optimised_ort_session_keeps_no_float_bmm_when_on(tmp_path: Path, bmm: bool) -> None:
    calib = feeds(np.random.default_rng(1801), 8)
    out, report = quantize(tmp_path, calib, target="ort", bmm=bmm, fuse_attention=False)  # the BMMs themselves
    ops = optimised_ops(out, tmp_path)
    integer = sum(op in ("MatMulIntegerToFloat", "QLinearMatMul") for op in ops)
    assert integer == (6 if bmm else 4), ops  # the q/k/v/o projections, and both BMMs when on
    assert sum(op in ("MatMul", "FusedMatMul") for op in ops) == (0 if bmm else 2), ops
    assert len(report["activation_matmuls"]) == (2 if bmm else 0)


def test_dynamic_scales_leave_the_bmms_float(tmp_path: Path) -> None:
    calib = feeds(np.random.default_rng(1802), 4)
    _, report = quantize(tmp_path, calib, target="ort", dynamic=True, bmm=True)
    assert report["activation_matmuls"] == []


def test_moved_nan_guard_gives_the_same_outputs_with_fully_masked_rows() -> None:
    rng = np.random.default_rng(1803)
    x = feeds(rng, 5)
    before = exported_attention()
    model = ir.from_proto(before)
    moved = move_nan_guards(model)
    assert len(moved) == 1
    ops = [n.op_type for n in model.graph]
    nan_test = next(n for n in model.graph if n.op_type == "IsNaN")
    assert nan_test.inputs[0].producer().op_type == "ReduceSum"  # type: ignore[union-attr]  # one test per row
    assert ops.index("Where") > ops.index("MatMul", ops.index("Softmax"))  # after probs·V
    want, got = run(before, x)[0], run(model, x)[0]
    assert np.isnan(run(with_outputs(before, ("p",)), x)[1][0]).all()  # the fully masked sample is the NaN case
    np.testing.assert_array_equal(got, want)
    assert np.isfinite(got).all()


def test_nan_guard_with_another_reader_is_left_alone() -> None:
    proto = exported_attention()
    proto.graph.node.append(helper.make_node("Identity", ["z"], ["z_out"]))
    proto.graph.output.append(tensor("z_out"))
    model = ir.from_proto(proto)
    assert move_nan_guards(model) == []
    assert sum(n.op_type == "IsNaN" for n in model.graph) == 1 and model.graph.node(-1).op_type == "Identity"


def test_guard_moved_only_for_the_ort_target(tmp_path: Path) -> None:
    calib = feeds(np.random.default_rng(1804), 4)
    out, report = quantize(tmp_path, calib, target="ort", fuse_attention=False)  # fused, no guard is left to move
    assert report["ort_rewrites"]["nan_guards_moved"] and not any(
        n.op_type == "IsNaN" and n.inputs[0].producer().op_type == "Softmax"  # type: ignore[union-attr]
        for n in load_model(out).graph
    )
    _, trt = quantize(tmp_path, calib, target="tensorrt")
    assert trt["ort_rewrites"] == {}


@pytest.mark.parametrize("flag", [None, "--bmm"])
def test_cli_bmm_is_off_by_default_and_on_with_the_flag(tmp_path: Path, flag: str | None) -> None:
    src = tmp_path / "model.onnx"
    onnx.save(exported_attention(), src)
    runner = CliRunner()
    args = ["quantize", str(src), "--target", "ort", "--shape", "x=2x6x8", "--shape", "mask=2x1x6x6"]
    args += [flag] if flag else []
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "q.onnx")], terminal_width=200)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "q.report.json").read_text())
    assert len(report["activation_matmuls"]) == (2 if flag else 0) and report["config"]["bmm"] == bool(flag)
    assert "--bmm" in runner.invoke(app, ["quantize", "--help"], terminal_width=200).output


def exported_gelu_mlp(seed: int = 2) -> onnx.ModelProto:
    """(x W1 + b) → x·(0.5·(1 + erf(x/√2))) → W2: the operand order PyTorch's exporter writes for gelu."""
    rng = np.random.default_rng(seed)
    consts = {
        "w1": (rng.standard_normal((D, 4 * D)) * 0.5).astype(np.float32),
        "b1": rng.standard_normal(4 * D).astype(np.float32),
        "w2": (rng.standard_normal((4 * D, D)) * 0.5).astype(np.float32),
        "root2": np.array(np.sqrt(2.0), np.float32),
        "one": np.array(1.0, np.float32),
        "half": np.array(0.5, np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h"]),
        helper.make_node("Div", ["h", "root2"], ["h_scaled"]),
        helper.make_node("Erf", ["h_scaled"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["e1"]),
        helper.make_node("Mul", ["half", "e1"], ["e_half"]),
        helper.make_node("Mul", ["h", "e_half"], ["g"]),
        helper.make_node("MatMul", ["g", "w2"], ["y"], name="fc2"),
    ]
    inits = [init(v, k) for k, v in consts.items()]
    return make_model(nodes, [tensor("x", shape=["b", S, D])], [tensor("y", shape=["b", S, D])], inits)


def test_reordered_gelu_is_bit_exact_and_fused_by_onnx_runtime(tmp_path: Path) -> None:
    x = {"x": (np.random.default_rng(1805).standard_normal((3, S, D)) * 3).astype(np.float32)}
    before = exported_gelu_mlp()
    model = ir.from_proto(before)
    assert reorder_erf_gelus(model) == ["g"]
    np.testing.assert_array_equal(run(model, x)[0], run(before, x)[0])  # reference kernels: the same floats
    for proto, fused in ((before, False), (ir.to_proto(model), True)):
        onnx.save(proto, tmp_path / "m.onnx")
        ops = optimised_ops(tmp_path / "m.onnx", tmp_path)
        assert ("Erf" not in ops) == fused and bool({"Gelu", "BiasGelu"} & set(ops)) == fused, ops
