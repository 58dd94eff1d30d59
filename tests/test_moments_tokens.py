"""The refit's Gram matrix over real tokens only: where an ``attention_mask`` input provably marks a tapped
tensor's rows, the Gram matrix (with its Σx and row count) is numpy's over the unmasked rows alone; Σx and Σx²
(flap's scores) stay over every row; elsewhere nothing changes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphprune.algorithms.structured import StructuredMethod
from graphprune.calibration.gram_taps import token_mask
from graphprune.calibration.moments import ChannelTap, collect_moments
from graphprune.calibration.request import CalibrationRequest
from graphprune.pipeline.shrink import ShrinkConfig, shrink_model
from tests.onnx_builders import draw, init, make_model, run, tensor

D, HIDDEN = 6, 800  # wider than 2 x 384: the Gram matrix is computed as blocks of its upper triangle


def _encoder(
    mask_dims: list[str | int] | None, hidden: int = HIDDEN, mask_type: int = TensorProto.INT64
) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """x [b, s, D] -> MatMul w1 -> Relu = g [b, s, hidden] -> MatMul w2; the mask input has ``mask_dims``."""
    rng = np.random.default_rng(5)
    w = {"w1": draw(rng, D, hidden), "w2": draw(rng, hidden, D)}
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["g"]),
        helper.make_node("MatMul", ["g", "w2"], ["y"]),
    ]
    inputs = [tensor("x", shape=["b", "s", D]), tensor("attention_mask", mask_type, mask_dims)]
    proto = make_model(nodes, inputs, [tensor("y", shape=["b", "s", D])], [init(v, k) for k, v in w.items()])
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto)), w


def _calibration(rng: np.random.Generator, batch: int = 10, seq: int = 7) -> dict[str, np.ndarray]:
    """Random inputs, each sample padded after a random number (1 to ``seq``) of real tokens."""
    lengths = rng.integers(1, seq + 1, size=batch)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    return {"x": draw(rng, batch, seq, D, scale=1.0), "attention_mask": mask}


@pytest.mark.parametrize(("stride", "pad"), [(1, 0), (2, 0), (1, 3), (2, 2)])
def test_gram_over_real_tokens_equals_numpy_over_the_unmasked_rows(stride: int, pad: int) -> None:
    """Real tokens' rows (every ``stride``-th), plus every (``stride`` x ``pad``)-th padded row counted ``pad``
    times: numpy's sums over exactly those rows, per batch as the taps slice them."""
    model, w = _encoder(["b", "s"])
    data = _calibration(np.random.default_rng(6))
    tap = ChannelTap("g", -1, HIDDEN, gram=True, gram_stride=stride, pad_stride=pad)
    moments = collect_moments(model, [tap], [], CalibrationRequest(data=data, batch_size=4))
    g = np.maximum(data["x"] @ w["w1"], 0).astype(np.float64)
    every = g.reshape(-1, HIDDEN)
    gram, sums, rows = np.zeros((HIDDEN, HIDDEN)), np.zeros(HIDDEN), 0
    for batch, mask in _batches(g, data["attention_mask"], 4):
        flat = batch.reshape(-1, HIDDEN)
        real, padded = flat[mask.ravel() == 1][::stride], flat[mask.ravel() == 0][:: stride * max(pad, 1)]
        weight = pad if pad > 1 else 0
        gram += real.T @ real + weight * padded.T @ padded
        sums += real.sum(0) + weight * padded.sum(0)
        rows += len(real) + weight * len(padded)
    assert (data["attention_mask"] == 0).sum() > 4 * max(pad, 1)  # the data has padding to sample
    got_gram, got_sums, got_rows = moments.gram_terms("g")
    assert got_rows == rows
    np.testing.assert_allclose(got_gram, gram, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(got_sums, sums, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(moments.sums["g"], every.sum(0), rtol=1e-4, atol=1e-3)  # flap's: every row
    np.testing.assert_allclose(moments.sumsq["g"], (every**2).sum(0), rtol=1e-4, atol=1e-3)
    assert moments.rows["g"] == every.shape[0]


def _batches(g: np.ndarray, mask: np.ndarray, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(g[i : i + size], mask[i : i + size]) for i in range(0, len(g), size)]


@pytest.mark.parametrize("mask_dims", [["b", "t"], ["b", 7], None])
def test_a_mask_that_is_not_provably_the_rows_changes_nothing(mask_dims: list | None) -> None:
    """A decoder's mask over past and new tokens (another length), or one of unknown shape: every row counts."""
    model, w = _encoder(mask_dims)
    assert token_mask(model, next(v for n in model.graph for v in n.outputs if v.name == "g")) is None
    data = _calibration(np.random.default_rng(7))
    tap = ChannelTap("g", -1, HIDDEN, gram=True, pad_stride=0)
    moments = collect_moments(model, [tap], [], CalibrationRequest(data=data))
    every = np.maximum(data["x"] @ w["w1"], 0).astype(np.float64).reshape(-1, HIDDEN)
    gram, _, rows = moments.gram_terms("g")
    assert rows == every.shape[0]
    np.testing.assert_allclose(gram, every.T @ every, rtol=1e-4, atol=1e-3)


def test_all_tokens_when_asked() -> None:
    model, w = _encoder(["b", "s"])
    data = _calibration(np.random.default_rng(8))
    tap = ChannelTap("g", -1, HIDDEN, gram=True, pad_stride=1)
    moments = collect_moments(model, [tap], [], CalibrationRequest(data=data, batch_size=3))
    every = np.maximum(data["x"] @ w["w1"], 0).astype(np.float64).reshape(-1, HIDDEN)
    gram, _, rows = moments.gram_terms("g")
    assert rows == every.shape[0]
    np.testing.assert_allclose(gram, every.T @ every, rtol=1e-4, atol=1e-3)


def test_shrink_refits_on_the_real_tokens_alone_with_pad_stride_0() -> None:
    """End to end: the undamped refit with no padded rows is numpy's least squares over the real rows only (the
    dense output from the kept neurons and a bias); with every row it is a different fit."""
    model, w = _encoder(["b", "s"], hidden=16)
    data = _calibration(np.random.default_rng(9), batch=40, seq=8)
    fits = {}
    for pad in (0, 1):
        m = ir.from_proto(ir.to_proto(model))
        config = ShrinkConfig(ratio=0.25, units=("mlp",), method=StructuredMethod.WANDA, damp=0.0, pad_stride=pad)
        (record,) = shrink_model(m, config, CalibrationRequest(data=data, batch_size=8)).groups
        assert record.refitted == 1 and len(record.removed) == 4
        fits[pad] = run(m, data)[0].reshape(-1, D), record.removed
    real = data["attention_mask"].ravel() == 1
    h = np.maximum(data["x"] @ w["w1"], 0).astype(np.float64).reshape(-1, 16)
    kept = np.setdiff1d(np.arange(16), fits[0][1])
    design = np.concatenate([h[:, kept], np.ones((len(h), 1))], axis=1)
    solution = np.linalg.lstsq(design[real], h[real] @ w["w2"], rcond=None)[0]
    np.testing.assert_allclose(fits[0][0], design @ solution, rtol=1e-3, atol=1e-3)
    assert fits[1][1] == fits[0][1]  # the same neurons (wanda's scores: every row), refitted on every row
    assert np.abs(fits[1][0] - fits[0][0]).max() > 1e-2


def test_a_negative_padding_stride_is_a_one_line_error(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from graphprune.cli import app

    model, _ = _encoder(["b", "s"], hidden=16)
    path, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    ir.save(model, path)
    before = path.read_bytes()
    result = CliRunner().invoke(
        app, ["shrink", str(path), "--ratio", "0.25", "--gram-padding", "-1", "-o", str(out)]
    )
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "invalid padding stride -1" in result.output
    assert not out.exists() and path.read_bytes() == before


def test_a_float_mask_is_never_read_as_real_tokens() -> None:
    """A float mask may be additive (0 for a real token, -inf for padding): its nonzeros are not the tokens."""
    model, _ = _encoder(["b", "s"], mask_type=TensorProto.FLOAT)
    assert token_mask(model, next(v for n in model.graph for v in n.outputs if v.name == "g")) is None
    model, _ = _encoder(["b", "s"])
    assert token_mask(model, next(v for n in model.graph for v in n.outputs if v.name == "g")) is not None
