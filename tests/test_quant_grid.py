"""Quantization grids: against scalar Python maths and against ONNX Runtime's QuantizeLinear/DequantizeLinear."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from graphprune.algorithms.quant_grid import (
    QuantGrid,
    dequantize_codes,
    fake_quantize,
    grid_scales,
    quantize_codes,
)
from tests.onnx_builders import init, make_model, run, tensor

QMAX = {"int8": 127, "int4": 7, "fp8": 448.0}
QMIN = {"int8": -127, "int4": -8}  # int4: ONNX's whole INT4 range; int8 stays symmetric

# --------------------------------------------------------------------------------------------------------------
# An independent reference, element by element: the scale of a slice is the larger of (largest positive weight)
# / qmax and (largest negative magnitude) / -qmin in float32; a code is Python's round() (half to even) of the
# float32 ratio, clamped to [qmin, qmax].
# --------------------------------------------------------------------------------------------------------------


def reference_scales(w: np.ndarray, precision: str, block: int | None) -> np.ndarray:
    rows, k = w.shape
    block = k if block is None else block
    out = []
    for r in range(rows):
        row = []
        for start in range(0, max(k, 1), block):
            values = [float(np.float32(x)) for x in w[r, start : start + block]]
            maxpos = max([x for x in values if x > 0], default=0.0)
            maxneg = max([-x for x in values if x < 0], default=0.0)
            qmin = QMIN.get(precision, -QMAX[precision])
            s = max(
                np.float32(np.float32(maxpos) / np.float32(QMAX[precision])),
                np.float32(np.float32(maxneg) / np.float32(-qmin)),
            )
            row.append(s if s > 0 else np.float32(1.0))
        out.append(row)
    return np.array(out, dtype=np.float32)


def reference_int_codes(w: np.ndarray, scales: np.ndarray, precision: str, block: int | None) -> np.ndarray:
    rows, k = w.shape
    block = k if block is None else block
    codes = np.zeros((rows, k), dtype=np.int64)
    for r in range(rows):
        for j in range(k):
            ratio = float(np.float32(w[r, j]) / scales[r, j // block])
            codes[r, j] = max(QMIN[precision], min(QMAX[precision], round(ratio)))
    return codes


def _weights(seed: int, rows: int, k: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, k)).astype(np.float32) * rng.uniform(0.01, 3.0, (rows, 1)).astype(np.float32)
    w[rng.random((rows, k)) < 0.3] = 0.0  # pruned weights must stay zero
    return w


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 6),
    k=st.integers(1, 40),
    precision=st.sampled_from(["int8", "int4"]),
    block=st.sampled_from([None, 1, 4, 8, 16, 32]),
)
def test_int_grid_matches_scalar_reference(
    seed: int, rows: int, k: int, precision: str, block: int | None
) -> None:
    w = _weights(seed, rows, k)
    grid = QuantGrid(precision=precision, block_size=block)  # type: ignore[arg-type]
    scales = grid_scales(w, grid)
    np.testing.assert_array_equal(scales, reference_scales(w, precision, block))
    codes = quantize_codes(w, scales, grid)
    assert codes.dtype == np.int8 == grid.code_dtype
    np.testing.assert_array_equal(codes, reference_int_codes(w, scales, precision, block))
    assert np.all(codes[w == 0] == 0)
    deq = dequantize_codes(codes, scales, grid)
    assert deq.dtype == np.float32
    block_of = np.arange(k) // (k if block is None else block)
    np.testing.assert_array_equal(deq, codes.astype(np.float32) * scales[:, block_of])
    # Round to nearest: every weight within half a step of its dequantized value (never saturated here).
    assert np.all(np.abs(deq - w) <= 0.5 * scales[:, block_of] * (1 + 1e-6))


def test_ties_round_half_to_even_and_saturation_to_the_grid_range() -> None:
    grid = QuantGrid(precision="int4")
    assert (grid.qmin, grid.qmax) == (-8.0, 7.0)
    # largest weight 1.75 = 7 · 0.25 positive: scale 0.25 (-1.0 / 8 is smaller), and k · 0.125 are exact ties
    w = np.array([[1.75, 0.125, 0.375, -0.125, -0.375, 0.625, 0.0, -1.0]], dtype=np.float32)
    scales = grid_scales(w, grid)
    assert scales[0, 0] == np.float32(0.25)
    np.testing.assert_array_equal(quantize_codes(w, scales, grid), [[7, 0, 2, 0, -2, 2, 0, -4]])
    # a negative extreme takes the code -8: scale 2.0 / 8, finer than 2.0 / 7
    negative = np.array([[-2.0, 1.5, 0.0]], dtype=np.float32)
    assert grid_scales(negative, grid)[0, 0] == np.float32(0.25)
    np.testing.assert_array_equal(quantize_codes(negative, grid_scales(negative, grid), grid), [[-8, 6, 0]])
    # Weights past the extremes (as a solver's updates make them) saturate to [-8, 7]; int8 stays symmetric
    far = np.array([[10.0, -10.0]], dtype=np.float32)
    np.testing.assert_array_equal(quantize_codes(far, scales, grid), [[7, -8]])
    int8 = QuantGrid(precision="int8")
    np.testing.assert_array_equal(quantize_codes(far, np.ones((1, 1), np.float32) * 0.01, int8), [[127, -127]])


def test_fp8_grid() -> None:
    w = _weights(3, 5, 24)
    grid = QuantGrid(precision="fp8", block_size=8)
    scales = grid_scales(w, grid)
    np.testing.assert_array_equal(scales, reference_scales(w, "fp8", 8))
    codes = quantize_codes(w, scales, grid)
    assert codes.dtype == np.dtype(ml_dtypes.float8_e4m3fn)
    # Each code is the E4M3 value nearest the ratio: no representable value lies strictly closer.
    ratio = w / scales[:, np.arange(24) // 8]
    finite = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    finite = finite[np.isfinite(finite)]
    nearest = np.abs(ratio[..., None] - finite).min(axis=-1)
    np.testing.assert_array_equal(np.abs(codes.astype(np.float64) - ratio), nearest)
    assert np.all(codes.astype(np.float32)[w == 0] == 0)
    assert np.abs(codes.astype(np.float32)).max() == 448.0  # each block's absmax lands on the top code
    assert np.all(
        quantize_codes(
            np.array([[1e6, -1e6]], np.float32), np.ones((1, 1), np.float32), QuantGrid(precision="fp8")
        ).astype(np.float32)
        == [[448.0, -448.0]]
    )


def test_all_zero_rows_and_blocks_get_positive_scales_and_dequantize_to_zero() -> None:
    w = np.zeros((3, 8), dtype=np.float32)
    w[1, :4] = [0.5, -1.0, 0.25, 0.0]
    w[2, 5] = 1e-44  # absmax / qmax underflows in float32
    for grid in (
        QuantGrid(precision="int8"),
        QuantGrid(precision="int4", block_size=4),
        QuantGrid(precision="fp8"),
    ):
        scales = grid_scales(w, grid)
        assert np.all(scales > 0) and np.all(np.isfinite(scales))
        deq = dequantize_codes(quantize_codes(w, scales, grid), scales, grid)
        np.testing.assert_array_equal(deq[0], 0.0)
        assert np.all(deq[w == 0] == 0)
    assert grid_scales(w, QuantGrid(precision="int4", block_size=4))[1, 1] == 1.0


def test_partial_last_block_and_shape_checks() -> None:
    w = _weights(5, 4, 10)
    grid = QuantGrid(precision="int8", block_size=4)
    scales = grid_scales(w, grid)
    assert scales.shape == (4, 3)
    np.testing.assert_array_equal(
        scales[:, 2], np.abs(w[:, 8:]).max(axis=1) / np.float32(127) + (np.abs(w[:, 8:]).max(axis=1) == 0)
    )
    with pytest.raises(ValueError, match="scales must be"):
        quantize_codes(w, scales[:, :2], grid)
    with pytest.raises(ValueError, match="block_size"):
        QuantGrid(precision="int8", block_size=0)
    with pytest.raises(ValueError, match="precision"):
        QuantGrid(precision="int2")  # type: ignore[arg-type]


def test_fake_quantize_is_rtn() -> None:
    w = _weights(9, 6, 32)
    grid = QuantGrid(precision="int4", block_size=16)
    scales = reference_scales(w, "int4", 16)
    codes = reference_int_codes(w, scales, "int4", 16)
    np.testing.assert_array_equal(
        fake_quantize(w, grid), codes.astype(np.float32) * scales[:, np.arange(32) // 16]
    )


# --------------------------------------------------------------------------------------------------------------
# ONNX Runtime on the same values: QuantizeLinear gives our codes, DequantizeLinear our floats.
# --------------------------------------------------------------------------------------------------------------

ONNX_TYPE = {"int8": TensorProto.INT8, "int4": TensorProto.INT4, "fp8": TensorProto.FLOAT8E4M3FN}
NP_TYPE = {"int8": np.int8, "int4": ml_dtypes.int4, "fp8": ml_dtypes.float8_e4m3fn}


def _qdq_attrs(grid: QuantGrid) -> dict[str, int]:
    # Per-row scales run along axis 0 of the (out, K) tensor; blocks along axis 1 (K).
    return {"axis": 0} if grid.block_size is None else {"axis": 1, "block_size": grid.block_size}


def _ort_quantize_dequantize(w: np.ndarray, scales: np.ndarray, grid: QuantGrid) -> np.ndarray:
    """ONNX Runtime: DequantizeLinear(QuantizeLinear(w)) with our scales and zero point 0."""
    scale = scales[:, 0] if grid.block_size is None else scales
    zero = np.zeros(scale.shape, dtype=NP_TYPE[grid.precision])
    nodes = [
        helper.make_node("QuantizeLinear", ["w", "s", "z"], ["q"], **_qdq_attrs(grid)),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **_qdq_attrs(grid)),
    ]
    model = make_model(
        nodes,
        [tensor("w", shape=list(w.shape))],
        [tensor("y", shape=list(w.shape))],
        [init(scale, "s"), init(zero, "z")],
        opset=21,
    )
    model.ir_version = 10
    return run(model, {"w": w})[0]


def _ort_dequantize(codes: np.ndarray, scales: np.ndarray, grid: QuantGrid) -> np.ndarray:
    """ONNX Runtime: DequantizeLinear of our codes stored as an initializer of the ONNX type."""
    scale = scales[:, 0] if grid.block_size is None else scales
    stored = codes.astype(NP_TYPE[grid.precision])
    node = helper.make_node("DequantizeLinear", ["q", "s"], ["y"], **_qdq_attrs(grid))
    model = make_model(
        [helper.make_node("Identity", ["x"], ["unused"]), node],
        [tensor("x", shape=[1])],
        [tensor("y", shape=list(codes.shape)), tensor("unused", shape=[1])],
        [init(stored, "q"), init(scale, "s")],
        opset=21,
    )
    model.ir_version = 10
    return run(model, {"x": np.zeros(1, np.float32)})[0]


@pytest.mark.parametrize("precision", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("block", [None, 16])
def test_onnx_runtime_dequantizes_our_codes_to_our_floats(precision: str, block: int | None) -> None:
    w = _weights(11, 8, 48)
    grid = QuantGrid(precision=precision, block_size=block)  # type: ignore[arg-type]
    scales = grid_scales(w, grid)
    codes = quantize_codes(w, scales, grid)
    np.testing.assert_array_equal(_ort_dequantize(codes, scales, grid), dequantize_codes(codes, scales, grid))


@pytest.mark.parametrize("precision", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("block", [None, 16])
def test_onnx_runtime_quantizes_to_our_codes(precision: str, block: int | None) -> None:
    w = _weights(12, 8, 48)
    w[0, :3] = [1.75, 0.125, 0.375]  # exact ties in row 0 (scale 1.75 / qmax for int4 …)
    grid = QuantGrid(precision=precision, block_size=block)  # type: ignore[arg-type]
    scales = grid_scales(w, grid)
    ours = dequantize_codes(quantize_codes(w, scales, grid), scales, grid)
    # Our scales are positive, so equal dequantized values mean equal codes.
    np.testing.assert_array_equal(_ort_quantize_dequantize(w, scales, grid), ours)
