"""graphprune quantize: Q/DQ models run by ONNX Runtime against numpy fake quantization, the pattern kept.

Each model is built in code, quantized by :func:`quantize_file` on calibration arrays, and run by ONNX Runtime; the
reference is numpy: the same network with weights rounded per output channel (symmetric) and activations rounded
per tensor with the scale numpy derives from the calibration batch's own activations.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper

from graphprune.algorithms.pattern import NMPattern
from graphprune.calibration.request import CalibrationRequest
from graphprune.pipeline.files import check_file
from graphprune.quantize.config import QuantizeConfig
from graphprune.quantize.files import quantize_file
from tests.onnx_builders import init, make_model, reference_nm_mask, run, tensor

D, H = 16, 32


def sparse(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A [K, N] MatMul weight pruned 2:4 along K."""
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return w * reference_nm_mask(w, 0, 2, 4)


W1, W2 = sparse((D, H), 1), sparse((H, D), 2)


def mlp() -> onnx.ModelProto:
    """y = relu(x @ W1) @ W2: both weights 2:4 along K."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["a"], name="fc1"),
        helper.make_node("Relu", ["a"], ["h"]),
        helper.make_node("MatMul", ["h", "W2"], ["y"], name="fc2"),
    ]
    return make_model(
        nodes, [tensor("x", shape=["b", D])], [tensor("y", shape=["b", D])], [init(W1, "W1"), init(W2, "W2")]
    )


def single_matmul(tmp_path: Path, w: np.ndarray) -> Path:
    """y = x @ W saved to ``tmp_path``."""
    k, n = w.shape
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")
    src = tmp_path / "model.onnx"
    model = make_model([node], [tensor("x", shape=["b", k])], [tensor("y", shape=["b", n])], [init(w, "W")])
    onnx.save(model, src)
    return src


def quantized(tmp_path: Path, model: onnx.ModelProto, calib: np.ndarray, **options: object) -> onnx.ModelProto:
    src = tmp_path / "model.onnx"
    onnx.save(model, src)
    config = QuantizeConfig(include_head=True, **options)  # type: ignore[arg-type]
    out, _ = quantize_file(src, config, tmp_path / "q.onnx", CalibrationRequest(data={"x": calib}), force=True)
    return onnx.load(out)


def fake_weight(w: np.ndarray, qmax: float = 127.0) -> np.ndarray:
    """Per output channel (column of [K, N]) symmetric round to nearest."""
    scale = np.abs(w).max(axis=0, keepdims=True) / qmax
    return np.clip(np.rint(w / scale), -qmax, qmax) * scale


def fake_symmetric(x: np.ndarray, amax: float) -> np.ndarray:
    scale = np.float32(amax / 127.0)
    return (np.clip(np.rint(x / scale), -128, 127) * scale).astype(np.float32)


def fake_asymmetric(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = np.float32((hi - lo) / 255.0)
    zero = np.clip(np.rint(-lo / scale), 0, 255)
    return ((np.clip(np.rint(x / scale) + zero, 0, 255) - zero) * scale).astype(np.float32)


def test_int8_tensorrt_matches_numpy_fake_quantization(tmp_path: Path) -> None:
    rng = np.random.default_rng(5300)  # this function's own data, whatever ran before
    calib = rng.standard_normal((64, D)).astype(np.float32)
    model = quantized(tmp_path, mlp(), calib, precision="int8", target="tensorrt")
    x = rng.standard_normal((8, D)).astype(np.float32)
    h_calib = np.maximum(calib @ W1, 0)
    h = np.maximum(fake_symmetric(x, np.abs(calib).max()) @ fake_weight(W1), 0)
    want = fake_symmetric(h, np.abs(h_calib).max()) @ fake_weight(W2)
    got = run(model, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.abs(got - np.maximum(x @ W1, 0) @ W2).max() > 1e-3  # it is quantized, not the float model


def test_int8_ort_target_uses_asymmetric_uint8_activations(tmp_path: Path) -> None:
    rng = np.random.default_rng(5301)  # this function's own data, whatever ran before
    calib = (rng.standard_normal((64, D)) + 0.7).astype(np.float32)
    model = quantized(tmp_path, mlp(), calib, precision="int8", target="ort")
    x = (rng.standard_normal((8, D)) + 0.7).astype(np.float32)
    h_calib = np.maximum(calib @ W1, 0)
    h = np.maximum(fake_asymmetric(x, calib.min(), calib.max()) @ fake_weight(W1), 0)
    want = fake_asymmetric(h, h_calib.min(), h_calib.max()) @ fake_weight(W2)
    np.testing.assert_allclose(run(model, {"x": x})[0], want, rtol=1e-4, atol=1e-4)
    q_types = {n.input[2] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    zero_points = [i for i in model.graph.initializer if i.name in q_types]
    assert zero_points and all(z.data_type == onnx.TensorProto.UINT8 for z in zero_points)


def test_pattern_survives_and_zero_points_are_zero(tmp_path: Path) -> None:
    rng = np.random.default_rng(5302)  # this function's own data, whatever ran before
    calib = rng.standard_normal((16, D)).astype(np.float32)
    model = quantized(tmp_path, mlp(), calib, precision="int8")
    g = ir.from_proto(model).graph
    for name, w in (("W1", W1), ("W2", W2)):
        codes = g.initializers[name].const_value.numpy()
        assert codes.dtype == np.int8
        np.testing.assert_array_equal(codes == 0, w == 0)  # the same zeros, no more (no weight rounds to 0 here)
        dq = next(u.node for u in g.initializers[name].uses())
        assert dq.op_type == "DequantizeLinear" and dq.attributes["axis"].value == 1
        assert not np.any(dq.inputs[2].const_value.numpy())
    for node in g:
        if node.op_type == "QuantizeLinear":  # per tensor: scalar scale and zero point, the zero point 0
            scale, zero = node.inputs[1].const_value.numpy(), node.inputs[2].const_value.numpy()
            assert scale.shape == zero.shape == () and zero.dtype == np.int8 and zero == 0
    onnx.save(model, tmp_path / "check.onnx")
    result = check_file(tmp_path / "check.onnx", NMPattern(2, 4), include_head=True)
    assert result.ok and {w.name for w in result.weights} == {"W1", "W2"}


def test_fp8_matches_numpy_e4m3(tmp_path: Path) -> None:
    rng = np.random.default_rng(5303)  # this function's own data, whatever ran before
    calib = rng.standard_normal((32, D)).astype(np.float32)
    model = quantized(tmp_path, mlp(), calib, precision="fp8")
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19

    def fp8(a: np.ndarray, scale: np.ndarray | float) -> np.ndarray:
        return (np.clip(a / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale).astype(
            np.float32
        )

    def fp8_weight(w: np.ndarray) -> np.ndarray:
        return fp8(w, (np.abs(w).max(axis=0, keepdims=True) / 448).astype(np.float32))

    x = rng.standard_normal((8, D)).astype(np.float32)
    h_calib = np.maximum(calib @ W1, 0)
    h = np.maximum(fp8(x, np.float32(np.abs(calib).max() / 448)) @ fp8_weight(W1), 0)
    want = fp8(h, np.float32(np.abs(h_calib).max() / 448)) @ fp8_weight(W2)
    np.testing.assert_allclose(run(model, {"x": x})[0], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block", [32, 64])
def test_int4_blocks_along_k(tmp_path: Path, block: int) -> None:
    rng = np.random.default_rng(5304)  # this function's own data, whatever ran before
    k, n = 128, 16
    w = sparse((k, n), 3)
    src = single_matmul(tmp_path, w)
    config = QuantizeConfig(precision="int4", block_size=block, include_head=True)
    out, report = quantize_file(src, config, tmp_path / "q.onnx", force=True)
    g = ir.load(out).graph
    codes = g.initializers["W"].const_value
    assert codes.dtype == ir.DataType.INT4
    dq = next(u.node for u in g.initializers["W"].uses())
    assert dq.attributes["axis"].value == 0 and dq.attributes["block_size"].value == block
    scale = dq.inputs[1].const_value.numpy()
    blocks = np.abs(w).reshape(k // block, block, n).max(axis=1) / 7
    np.testing.assert_allclose(scale, blocks, rtol=1e-6)  # [K / block, N]: one scale per block along K
    expanded = np.repeat(blocks, block, axis=0)
    ref = np.clip(np.rint(w / expanded), -7, 7)
    np.testing.assert_array_equal(codes.numpy().astype(np.int8), ref)
    assert np.all(ref[w == 0] == 0)  # the pruned zeros
    assert not any(node.op_type == "QuantizeLinear" for node in g)  # weight-only
    x = rng.standard_normal((4, k)).astype(np.float32)
    np.testing.assert_allclose(run(ir.load(out), {"x": x})[0], x @ (ref * expanded), rtol=1e-4, atol=1e-4)
    assert report.result.weights[0].precision == "int4"
    options = ort.SessionOptions()  # ONNX Runtime's CPU optimiser fuses DQ(int4) -> MatMul into MatMulNBits
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    assert [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node] == ["MatMulNBits"]
    assert check_file(out, NMPattern(2, 4), include_head=True).ok


@pytest.mark.parametrize(
    ("k", "n", "target", "stored"),
    [
        (96, 3, "ort", 64),  # the last block of 32: ONNX's shorter last block, scale [2, N]
        (96, 3, "tensorrt", 32),  # gcd(96, 64) = 32: every block whole, each grid scale written twice
        (45, 3, "ort", 64),  # K odd: 135 int4 codes, an odd count packed two per byte
    ],
)
def test_int4_partial_last_block(tmp_path: Path, k: int, n: int, target: str, stored: int) -> None:
    """K not a multiple of the block: blocks of 64 along K, the last one shorter; ONNX Runtime, fused or not,
    computes x @ (code · scale) with numpy's codes and scales."""
    rng = np.random.default_rng(5309)  # this function's own data, whatever ran before
    w = sparse((k, n), 6) if k % 4 == 0 else rng.standard_normal((k, n)).astype(np.float32)
    src = single_matmul(tmp_path, w)
    config = QuantizeConfig(precision="int4", block_size=64, target=target, include_head=True)  # type: ignore[arg-type]
    out, report = quantize_file(src, config, tmp_path / "q.onnx", force=True)
    assert [r.name for r in report.result.weights] == ["W"] and not report.kept
    # numpy's grid, block by block: absmax / 7 over 64 rows of K (the last block what is left), round half even
    scales = np.stack([np.abs(w[i : i + 64]).max(axis=0) / np.float32(7) for i in range(0, k, 64)])
    expanded = np.repeat(scales, 64, axis=0)[:k]  # one scale per row of K
    ref = np.clip(np.rint(w / expanded), -7, 7)
    proto = onnx.load(out)
    values = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}  # onnx's own unpacking
    np.testing.assert_array_equal(values["W"].astype(np.int8), ref)
    assert np.all(ref[w == 0] == 0)
    dq = next(node for node in proto.graph.node if node.op_type == "DequantizeLinear")
    attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
    assert attrs == {"axis": 0, "block_size": stored}
    stored_scale = values[dq.input[1]]
    assert stored_scale.shape == (-(-k // stored), n) and values[dq.input[2]].shape == stored_scale.shape
    np.testing.assert_array_equal(np.repeat(stored_scale, stored, axis=0)[:k], expanded)  # the same weights
    x = rng.standard_normal((4, k)).astype(np.float32)
    want = x @ (ref * expanded)
    np.testing.assert_allclose(run(proto, {"x": x})[0], want, rtol=1e-4, atol=1e-4)
    options = ort.SessionOptions()  # ONNX Runtime's optimiser fuses DQ(int4) -> MatMul into MatMulNBits
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # float compute
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    fused = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(fused.run(None, {"x": x})[0], want, rtol=1e-4, atol=1e-4)
    assert [node.op_type for node in onnx.load(tmp_path / "optimized.onnx").graph.node] == ["MatMulNBits"]
    if k % 4 == 0:
        assert check_file(out, NMPattern(2, 4), include_head=True).ok


def test_gptq_under_the_mask_beats_round_to_nearest_and_keeps_zeros(tmp_path: Path) -> None:
    rng = np.random.default_rng(5305)  # this function's own data, whatever ran before
    k, n = 64, 32
    w = sparse((k, n), 4)
    src = single_matmul(tmp_path, w)
    mix = np.random.default_rng(8).standard_normal((k, k)).astype(np.float32)
    calib = (rng.standard_normal((256, k)) @ mix).astype(np.float32)  # correlated inputs: GPTQ's case
    request = CalibrationRequest(data={"x": calib}, batch_size=64)
    errors = {}
    for method in ("rtn", "gptq"):
        config = QuantizeConfig(precision="int4", block_size=32, method=method, include_head=True)
        out, _ = quantize_file(src, config, tmp_path / f"{method}.onnx", request, force=True)
        g = ir.load(out).graph
        codes = g.initializers["W"].const_value.numpy().astype(np.float32)
        np.testing.assert_array_equal(codes[w == 0], 0)
        scale = next(u.node for u in g.initializers["W"].uses()).inputs[1].const_value.numpy()
        effective = codes * np.repeat(scale, 32, axis=0)
        errors[method] = np.linalg.norm(calib @ effective - calib @ w)
    assert errors["gptq"] < 0.92 * errors["rtn"], errors


def test_dynamic_activations_match_numpy(tmp_path: Path) -> None:
    """DynamicQuantizeLinear: uint8, per tensor, range widened to hold 0, computed on the input itself."""
    rng = np.random.default_rng(5306)  # this function's own data, whatever ran before
    src = tmp_path / "model.onnx"
    onnx.save(mlp(), src)
    config = QuantizeConfig(precision="int8", dynamic=True, include_head=True)
    out, report = quantize_file(src, config, tmp_path / "q.onnx", force=True)
    assert all(a.scale is None for a in report.result.activations)
    x = rng.standard_normal((8, D)).astype(np.float32)
    h = np.maximum(fake_asymmetric(x, x.min(), x.max()) @ fake_weight(W1), 0)
    want = fake_asymmetric(h, h.min(), h.max()) @ fake_weight(W2)
    np.testing.assert_allclose(run(onnx.load(out), {"x": x})[0], want, rtol=1e-4, atol=1e-4)


def test_tied_head_is_untied_exactly_and_quantized_with_include_head(tmp_path: Path) -> None:
    """Gather(E, ids) embeds, MatMul(h, Transpose(E)) is the head: the head gets its own int8 copy."""
    rng = np.random.default_rng(5307)  # this function's own data, whatever ran before
    from graphprune.graph.model_io import load_model
    from graphprune.quantize.untie import untie_head_tables

    v = 24
    e = rng.standard_normal((v, D)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["x"]),
        helper.make_node("MatMul", ["x", "W1"], ["a"]),
        helper.make_node("Relu", ["a"], ["h"]),
        helper.make_node("MatMul", ["h", "W2"], ["y"]),
        helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0]),
        helper.make_node("MatMul", ["y", "Et"], ["logits"], name="head"),
    ]
    model = make_model(
        nodes,
        [tensor("ids", onnx.TensorProto.INT64, ["b", 6])],
        [tensor("logits", shape=["b", 6, v])],
        [init(e, "E"), init(W1, "W1"), init(W2, "W2")],
    )
    src = tmp_path / "tied.onnx"
    onnx.save(model, src)
    ids = rng.integers(0, v, (2, 6)).astype(np.int64)
    untied = load_model(src)
    assert untie_head_tables(untied) == ["E"]
    np.testing.assert_array_equal(run(untied, {"ids": ids})[0], run(model, {"ids": ids})[0])  # exact
    request = CalibrationRequest(data={"ids": ids})
    config = QuantizeConfig(precision="int8", include_head=True)
    out, report = quantize_file(src, config, tmp_path / "q.onnx", request, force=True)
    assert report.untied == ["E"] and "E_matmul" in {w.name for w in report.result.weights}
    g = ir.load(out).graph
    assert g.initializers["E"].const_value.dtype == ir.DataType.FLOAT  # the Gather's table stays float
    assert g.initializers["E_matmul"].const_value.dtype == ir.DataType.INT8
    _, report = quantize_file(src, QuantizeConfig(precision="int8"), tmp_path / "f.onnx", request, force=True)
    assert not report.untied and "E" in {k.name for k in report.kept}


def test_onnx_runtime_fuses_every_ort_target_matmul(tmp_path: Path) -> None:
    """Its CPU optimiser turns each DQ(uint8) -> MatMul <- DQ(int8) group into an integer kernel, no float MatMul
    left (with int8 activations, --target tensorrt, it fuses only some: BENCHMARKS.md)."""
    rng = np.random.default_rng(5308)  # this function's own data, whatever ran before
    calib = rng.standard_normal((16, D)).astype(np.float32)
    quantized(tmp_path, mlp(), calib, precision="int8", target="ort")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "q.onnx"), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node]
    integer = {"MatMulIntegerToFloat", "QLinearMatMul"}  # the latter where a Relu -> Q follows (Relu folded)
    assert sum(op in integer for op in ops) == 2 and not {"MatMul", "DequantizeLinear"} & set(ops), ops


def test_massive_inputs_stay_float_above_the_threshold(tmp_path: Path) -> None:
    rng = np.random.default_rng(5309)  # this function's own data, whatever ran before
    calib = rng.standard_normal((32, D)).astype(np.float32)
    calib[0, 3] = 500.0  # one massive activation in x; h = relu(x @ W1) inherits a large one too
    peak_x = np.abs(calib).max()
    peak_h = np.abs(np.maximum(calib @ W1, 0)).max()
    threshold = float(min(peak_x, peak_h)) - 1.0
    src = tmp_path / "model.onnx"
    onnx.save(mlp(), src)
    config = QuantizeConfig(include_head=True, float_above=threshold)
    _, report = quantize_file(src, config, tmp_path / "q.onnx", CalibrationRequest(data={"x": calib}), force=True)
    kept = {k.name: k.reason for k in report.kept}
    assert {"W1", "W2"} <= set(kept) and "above" in kept["W1"] and not report.result.weights
    config = QuantizeConfig(include_head=True, float_above=float(max(peak_x, peak_h)) + 1.0)
    _, report = quantize_file(src, config, tmp_path / "q2.onnx", CalibrationRequest(data={"x": calib}), force=True)
    assert {w.name for w in report.result.weights} == {"W1", "W2"}


def test_the_pass_refuses_codes_that_break_the_pattern() -> None:
    """The post-condition: codes with a non-zero where the weight was pruned break 2:4, and the pass says so."""
    from graphprune.algorithms.quant_grid import QuantGrid, grid_scales, quantize_codes
    from graphprune.passes.base import PassPostconditionError
    from graphprune.quantize.passes import QuantizePass
    from graphprune.quantize.select import plan_quantization

    model = ir.from_proto(mlp())
    config = QuantizeConfig(precision="int8", dynamic=True, include_head=True)
    plan = plan_quantization(model, config)
    canonical = W1.T.copy()  # (out, K)
    grid = QuantGrid(precision="int8")
    scales = grid_scales(canonical, grid)
    codes = quantize_codes(canonical, scales, grid)
    codes[0, np.flatnonzero(canonical[0] == 0)[0]] = 5  # a pruned weight comes back
    with pytest.raises(PassPostconditionError, match="W1"):
        QuantizePass(config=config, targets=plan.targets, solved={"W1": (codes, scales)})(model)
