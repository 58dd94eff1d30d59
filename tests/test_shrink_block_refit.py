"""Whole-block reconstruction in the streamed sequential shrink (``refit_scope="all"``): the layers that lose
nothing are refitted towards the dense outputs, level by level; numpy least squares on the same activations is the
reference, and with nothing shrunk upstream nothing changes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from graphprune.algorithms.structured import StructuredMethod
from graphprune.calibration.request import CalibrationRequest
from graphprune.errors import GraphpruneError
from graphprune.pipeline.shrink import ShrinkConfig, shrink_model
from tests.decoder_models import decoder_like, feeds
from tests.onnx_builders import SEQ, attention, draw, init, make_model, residual_stack, run, tensor

HEADS, HEAD_DIM, D, HIDDEN = 4, 2, 8, 12


def _initializers(model: ir.Model) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in ir.to_proto(model).graph.initializer}


def _config(blend: float, **options: object) -> ShrinkConfig:
    return ShrinkConfig(
        ratio=0.25, method=StructuredMethod.FLAP, refit=True, damp=0.0, allocate="uniform", sequential=True,
        target="dense", target_blend=blend, refit_scope="all", **options,  # type: ignore[arg-type]
    )  # fmt: skip


def _lstsq(
    x_shrunk: np.ndarray, x_dense: np.ndarray, w: np.ndarray, blend: float, kept: np.ndarray | None = None
) -> np.ndarray:
    """The weight fitting ``blend`` of the dense output plus the rest of the shrunk one's on the shrunk input
    (with ``kept``: on those of its channels, and a bias row)."""
    design = x_shrunk if kept is None else np.concatenate([x_shrunk[:, kept], np.ones((len(x_shrunk), 1))], axis=1)
    goal = blend * (x_dense @ w) + (1.0 - blend) * (x_shrunk @ w)
    return np.linalg.lstsq(design, goal, rcond=None)[0]


@pytest.mark.parametrize("blend", [1.0, 0.5])
def test_whole_block_refit_equals_numpy_least_squares_level_by_level(blend: float) -> None:
    rng = np.random.default_rng(5701)  # this function's own data, whatever ran before
    model, weights, _ = residual_stack(d=8, hidden=12)
    calib = {"x": rng.standard_normal((96, 8)).astype(np.float32)}
    m = ir.from_proto(model)
    report = shrink_model(m, _config(blend), CalibrationRequest(data=calib, batch_size=32))
    got = _initializers(m)
    dense = shrunk = calib["x"].astype(np.float64)
    for i, ((w1, w2), g) in enumerate(zip(weights, report.groups, strict=True)):
        kept = np.setdiff1d(np.arange(12), g.removed)
        # W1 loses nothing: fitted first, on the shrunk prefix's input; then the MLP on W1's refitted output
        w1_fit = _lstsq(shrunk, dense, w1, blend)
        h_d, h_s = np.maximum(dense @ w1, 0.0), np.maximum(shrunk @ w1_fit, 0.0)
        w2_fit = _lstsq(h_s, h_d, w2, blend, kept)
        if i == 0:  # nothing shrunk upstream: W1 as it was
            np.testing.assert_allclose(w1_fit, w1, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got[f"w1_{i}"], w1_fit[:, kept], rtol=2e-3, atol=2e-4, err_msg=f"w1_{i}")
        np.testing.assert_allclose(got[f"w2_{i}"], w2_fit[:-1], rtol=2e-3, atol=2e-4, err_msg=f"w2_{i}")
        dense = dense + h_d @ w2
        shrunk = shrunk + h_s[:, kept] @ w2_fit[:-1] + w2_fit[-1]
    np.testing.assert_allclose(run(ir.to_proto(m), calib)[0], 2 * shrunk, rtol=1e-3, atol=1e-3)


def _mlp_then_attention() -> tuple[onnx.ModelProto, dict]:
    """x -> x + relu(x W1) W2 (the MLP a shrink shrinks) -> the attention block of :func:`attention`."""
    rng = np.random.default_rng(5702)
    att, w = attention(heads=HEADS, kv_heads=HEADS, head_dim=HEAD_DIM, d=D)
    w = {**w, "w1": draw(rng, D, HIDDEN), "w2": draw(rng, HIDDEN, D)}
    nodes = [
        helper.make_node("MatMul", ["t", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["m"]),
        helper.make_node("Add", ["t", "m"], ["x"]),
        *att.graph.node,
    ]
    inits = [*att.graph.initializer, init(w["w1"], "w1"), init(w["w2"], "w2")]
    model = make_model(nodes, [tensor("t", shape=["b", SEQ, D])], [tensor("y", shape=["b", SEQ, D])], inits)
    return model, w


def _attention_np(w: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The attention's input of O, and its output x + a Wo (float64)."""
    b, s, _ = x.shape
    q = (x @ w["wq"] + w["bq"]).reshape(b, s, HEADS, HEAD_DIM).transpose(0, 2, 1, 3)
    k, v = ((x @ w[n]).reshape(b, s, HEADS, HEAD_DIM).transpose(0, 2, 1, 3) for n in ("wk", "wv"))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(HEAD_DIM)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    a = (p @ v).transpose(0, 2, 1, 3).reshape(b, s, HEADS * HEAD_DIM)
    return a, x + a @ w["wo"]


@pytest.mark.parametrize("blend", [1.0, 0.25])
def test_attention_after_a_shrunk_mlp_is_refitted_q_k_v_then_o(blend: float) -> None:
    rng = np.random.default_rng(5703)  # this function's own data, whatever ran before
    model, w = _mlp_then_attention()
    calib = {"t": rng.standard_normal((48, SEQ, D)).astype(np.float32)}
    m = ir.from_proto(model)
    config = _config(blend, units=("mlp",))
    report = shrink_model(m, config, CalibrationRequest(data=calib, batch_size=16))
    got = _initializers(m)
    assert len(report.groups[0].removed) == 3  # the MLP shrinks: the attention's input changes
    t = calib["t"].astype(np.float64)
    x_d = t + np.maximum(t @ w["w1"], 0.0) @ w["w2"]
    x_s = t + np.maximum(t @ got["w1"], 0.0) @ got["w2"] + got[f"{_bias_of(got)}"]
    rows = (-1, D)
    fitted = {n: _lstsq(x_s.reshape(rows), x_d.reshape(rows), w[n], blend) for n in ("wq", "wk", "wv")}
    for name, solution in fitted.items():  # Q/K/V on the shrunk prefix's input (Q's stored bias kept)
        np.testing.assert_allclose(got[name], solution, rtol=2e-3, atol=2e-4, err_msg=name)
    a_d, _ = _attention_np(w, x_d)
    a_s, _ = _attention_np({**w, **fitted}, x_s)  # O's input from the refitted Q/K/V: fitted after them
    wo = _lstsq(a_s.reshape(rows), a_d.reshape(rows), w["wo"], blend)
    np.testing.assert_allclose(got["wo"], wo, rtol=2e-3, atol=2e-4)
    expected = x_s + a_s @ wo
    np.testing.assert_allclose(run(ir.to_proto(m), calib)[0], expected, rtol=1e-3, atol=1e-3)


def _bias_of(weights: dict[str, np.ndarray]) -> str:
    """The bias the dense-target shrink added to the MLP's down projection."""
    return next(name for name in weights if name.endswith("_graphprune_bias"))


@pytest.mark.parametrize("build", ["decoder", "attention"])
def test_with_nothing_removed_every_layer_and_the_outputs_stay(build: str) -> None:
    if build == "decoder":
        model, calib = decoder_like(), feeds()
        request = CalibrationRequest(data=calib, batch_size=2)
    else:
        model, _ = _mlp_then_attention()
        calib = [{"t": np.random.default_rng(5704).standard_normal((16, SEQ, D)).astype(np.float32)}]
        request = CalibrationRequest(data=calib[0], batch_size=8)
    m = ir.from_proto(model)
    config = replace(_config(1.0, units=("mlp",)), damp=0.01, overrides=(("*", 0.0),))
    report = shrink_model(m, config, request)
    assert all(not g.removed for g in report.groups)
    before, after = _initializers(ir.from_proto(model)), _initializers(m)
    for name, array in before.items():  # a zero bias is added where a consumer had none
        np.testing.assert_allclose(after[name], array, rtol=1e-5, atol=1e-5, err_msg=name)
    for feed in calib:  # ONNX Runtime before and after
        np.testing.assert_allclose(run(ir.to_proto(m), feed)[0], run(model, feed)[0], rtol=1e-4, atol=1e-4)


def test_whole_block_refit_needs_dense_targets() -> None:
    with pytest.raises(GraphpruneError, match="target=dense"):
        ShrinkConfig(ratio=0.25, sequential=True, refit_scope="all").validate()
    with pytest.raises(GraphpruneError, match="refit scope"):
        ShrinkConfig(ratio=0.25, sequential=True, target="dense", refit_scope="some").validate()
