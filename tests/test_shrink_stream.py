"""Sequential shrinking streamed block by block: the same model as measuring every group with a run of its own
on the shrunk prefix, in one pass; the Σx taps it reads equal numpy's."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import graphprune.pipeline.shrink as shrink_module
from graphprune.algorithms.structured import StructuredMethod
from graphprune.calibration.request import CalibrationRequest
from graphprune.calibration.run import calibrate
from graphprune.errors import GraphpruneError
from graphprune.graph.targets import find_targets
from graphprune.pipeline.shrink import ShrinkConfig, calibrated, shrink_model
from tests.decoder_models import decoder_like, feeds
from tests.onnx_builders import residual_stack, run


def _initializers(model: ir.Model) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in ir.to_proto(model).graph.initializer}


def _both(
    model: onnx.ModelProto, config: ShrinkConfig, request: CalibrationRequest
) -> tuple[ir.Model, ir.Model, int]:
    """The model shrunk streamed (``calibration`` given) and group by group (only a ``measure``: a run per
    group), and how many tapped runs the streamed one made."""
    runs = []
    measure = calibrated(request)

    def counted(m, channels, pairs):  # type: ignore[no-untyped-def]
        runs.append(1)
        return measure(m, channels, pairs)

    streamed, per_group = ir.from_proto(model), ir.from_proto(model)
    shrink_model(streamed, config, request, measure=counted)
    streamed_runs = len(runs)
    shrink_model(per_group, config, measure=measure)
    return streamed, per_group, streamed_runs


@pytest.mark.parametrize("method", [StructuredMethod.FLAP, StructuredMethod.OBS])
@pytest.mark.parametrize("allocate", ["uniform", "global"])
def test_streamed_equals_one_run_per_group_on_a_residual_stack(method: StructuredMethod, allocate: str) -> None:
    rng = np.random.default_rng(5601)  # this function's own data, whatever ran before
    model, _, _ = residual_stack(d=8, hidden=12)
    calib = {"x": rng.standard_normal((64, 8)).astype(np.float32)}
    request = CalibrationRequest(data=calib, batch_size=16)
    config = ShrinkConfig(ratio=0.25, method=method, refit=True, damp=0.01, allocate=allocate, sequential=True)
    streamed, per_group, runs = _both(model, config, request)
    assert runs == (1 if allocate == "global" else 0)  # the allocation's dense run only: the groups streamed
    a, b = _initializers(streamed), _initializers(per_group)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5, err_msg=name)
    x = calib["x"][:8]
    np.testing.assert_allclose(run(ir.to_proto(streamed), {"x": x})[0], run(ir.to_proto(per_group), {"x": x})[0],
                               rtol=1e-4, atol=1e-4)  # fmt: skip


def test_streamed_decoder_with_embedding_and_head_equals_one_run_per_group() -> None:
    request = CalibrationRequest(data=feeds(), batch_size=2)
    config = ShrinkConfig(
        ratio=0.25, method=StructuredMethod.FLAP, refit=True, allocate="uniform", sequential=True
    )
    streamed, per_group, runs = _both(decoder_like(), config, request)
    assert runs == 0
    a, b = _initializers(streamed), _initializers(per_group)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-4, err_msg=name)
    assert a["b1"].shape == (12, 8)  # 16 -> 12 neurons in every block


def test_a_group_whose_weights_span_two_blocks_falls_back_to_one_run_per_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(5602)  # this function's own data, whatever ran before
    model, _, _ = residual_stack(d=8, hidden=12)
    calib = {"x": rng.standard_normal((32, 8)).astype(np.float32)}
    request = CalibrationRequest(data=calib, batch_size=16)
    monkeypatch.setattr(shrink_module, "stream_targets", lambda *args: None)
    runs = []
    measure = calibrated(request)

    def counted(m, channels, pairs):  # type: ignore[no-untyped-def]
        runs.append(1)
        return measure(m, channels, pairs)

    config = ShrinkConfig(
        ratio=0.25, method=StructuredMethod.FLAP, refit=True, allocate="uniform", sequential=True
    )
    shrink_model(ir.from_proto(model), config, request, measure=counted)
    assert len(runs) == 3  # one run per group


def test_sum_taps_equal_numpy() -> None:
    rng = np.random.default_rng(5603)  # this function's own data, whatever ran before
    model, weights, _ = residual_stack(d=8, hidden=12)
    x = rng.standard_normal((40, 8)).astype(np.float32) + 0.5
    m = ir.from_proto(model)
    targets = [t for t in find_targets(m).targets if t.name in ("w1_0", "w2_0")]
    stats = calibrate(m, CalibrationRequest(data={"x": x}, batch_size=10), targets)
    assert not stats.sums  # not asked for: the ordinary calibration is unchanged
    from graphprune.calibration.run import Accumulator
    from graphprune.calibration.session import Session
    from graphprune.calibration.taps import plan_taps, tapped_model

    with plan_taps(m, targets, gram=False, sums=True) as plan:
        session = Session(tapped_model(m, plan), ["CPUExecutionProvider"])
    acc = Accumulator(plan)
    for batch in np.split(x, 4):
        acc.add(session.run(plan.output_names, {"x": batch}, "a batch"))
    got = acc.result(targets, [])
    relu = np.maximum(x.astype(np.float64) @ weights[0][0], 0.0)
    np.testing.assert_allclose(got.sums["w1_0"], x.astype(np.float64).sum(axis=0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got.sums["w2_0"], relu.sum(axis=0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got.sumsq["w2_0"], (relu**2).sum(axis=0), rtol=1e-5, atol=1e-4)


def test_sequential_without_calibration_data_keeps_the_per_group_runs() -> None:
    rng = np.random.default_rng(5604)  # this function's own data, whatever ran before
    model, _, _ = residual_stack(d=8, hidden=12)
    calib = {"x": rng.standard_normal((32, 8)).astype(np.float32)}
    config = ShrinkConfig(
        ratio=0.25, method=StructuredMethod.FLAP, refit=True, allocate="uniform", sequential=True
    )
    m = ir.from_proto(model)
    report = shrink_model(m, replace(config), measure=calibrated(CalibrationRequest(data=calib, batch_size=16)))
    assert [g.units_after for g in report.groups] == [9, 9, 9]


def _dense_target_numpy(x: np.ndarray, weights: list, removed: list[list[int]], blend: float) -> list:
    """Block by block in numpy: each block's kept W2 rows and bias fitted by least squares from the shrunk
    prefix's hidden activations to ``blend`` of the dense block's output plus the rest of the shrunk one's (a block
    that loses nothing too: its input changed)."""
    dense, shrunk, fitted = x.astype(np.float64), x.astype(np.float64), []
    for (w1, w2), gone in zip(weights, removed, strict=True):
        h_d, h_s = np.maximum(dense @ w1, 0.0), np.maximum(shrunk @ w1, 0.0)
        kept = np.setdiff1d(np.arange(w1.shape[1]), gone)
        design = np.concatenate([h_s[:, kept], np.ones((len(h_s), 1))], axis=1)
        goal = blend * (h_d @ w2) + (1.0 - blend) * (h_s @ w2)
        solution = np.linalg.lstsq(design, goal, rcond=None)[0]
        fitted.append(solution)
        dense = dense + h_d @ w2
        shrunk = shrunk + design @ solution
    return fitted


@pytest.mark.parametrize(("blend", "overrides"), [(1.0, ()), (0.5, ()), (1.0, (("*w2_1*", 0.0),))])
def test_dense_target_refit_equals_numpy_least_squares_block_by_block(blend: float, overrides: tuple) -> None:
    rng = np.random.default_rng(5605)  # this function's own data, whatever ran before
    model, weights, _ = residual_stack(d=8, hidden=12)
    calib = {"x": rng.standard_normal((96, 8)).astype(np.float32)}
    request = CalibrationRequest(data=calib, batch_size=32)
    config = ShrinkConfig(
        ratio=0.25, method=StructuredMethod.FLAP, refit=True, damp=0.0, allocate="uniform", sequential=True,
        target="dense", target_blend=blend, overrides=overrides,
    )  # fmt: skip
    m = ir.from_proto(model)
    report = shrink_model(m, config, request)
    assert [len(g.removed) for g in report.groups] == ([3, 0, 3] if overrides else [3, 3, 3])
    fitted = _dense_target_numpy(calib["x"], weights, [g.removed for g in report.groups], blend)
    got = _initializers(m)
    for i, solution in enumerate(fitted):
        np.testing.assert_allclose(got[f"w2_{i}"], solution[:-1], rtol=2e-3, atol=2e-4)
        np.testing.assert_allclose(got[f"m{i}_graphprune_bias"], solution[-1], rtol=2e-3, atol=2e-4)
    # the shrunk model computes what numpy's fitted blocks compute
    x = calib["x"].astype(np.float64)
    for (w1, _), solution, g in zip(weights, fitted, report.groups, strict=True):
        kept = np.setdiff1d(np.arange(12), g.removed)
        x = x + np.maximum(x @ w1, 0.0)[:, kept] @ solution[:-1] + solution[-1]
    np.testing.assert_allclose(run(ir.to_proto(m), calib)[0], 2 * x, rtol=1e-3, atol=1e-3)


def test_dense_target_with_nothing_shrunk_upstream_is_todays_refit() -> None:
    rng = np.random.default_rng(5606)  # this function's own data, whatever ran before
    model, _, _ = residual_stack(d=8, hidden=12)
    calib = {"x": rng.standard_normal((64, 8)).astype(np.float32)}
    request = CalibrationRequest(data=calib, batch_size=16)
    # only the first block loses units: its dense and shrunk inputs are the same
    config = ShrinkConfig(
        ratio=0.25, units=("mlp",), method=StructuredMethod.FLAP, refit=True, damp=0.01, sequential=True,
        overrides=(("*w2_0*", 0.25), ("*", 0.0)), allocate="uniform",
    )  # fmt: skip
    dense, pruned = ir.from_proto(model), ir.from_proto(model)
    shrink_model(dense, replace(config, target="dense"), request)
    shrink_model(pruned, config, request)
    a, b = _initializers(dense), _initializers(pruned)
    for name in ("w1_0", "w2_0", "m0_graphprune_bias"):  # the later blocks' inputs differ: refitted towards dense
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert not np.allclose(a["w2_1"], b["w2_1"], atol=1e-4)


def test_dense_target_needs_sequential() -> None:
    with pytest.raises(GraphpruneError, match="sequential"):
        ShrinkConfig(ratio=0.25, target="dense").validate()
    with pytest.raises(GraphpruneError, match="target_blend"):
        ShrinkConfig(ratio=0.25, sequential=True, target="dense", target_blend=1.5).validate()
