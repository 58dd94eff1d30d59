"""The structured refit: its closed form against numpy least squares on the same activations, and `shrink` with it
checked through ONNX Runtime (removing zero channels changes nothing; the refitted model equals lstsq)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphprune.algorithms.refit import greedy_costs, output_error, refit, removal_costs
from graphprune.algorithms.structured import StructuredMethod, flap_bias
from graphprune.calibration.request import CalibrationRequest
from graphprune.errors import GraphpruneError
from graphprune.pipeline.shrink import ShrinkConfig, shrink_model
from tests.mobilenet_models import CIN, HW, C, block_np, mobilenet_block, mobilenet_weights
from tests.onnx_builders import (
    Net,
    bert_mlp,
    gelu_tanh,
    gemm_mlp,
    gemma_mlp,
    init,
    llama_mlp,
    make_model,
    residual_stack,
    rms_norm,
    run,
    silu,
)

NETS = {"llama_mlp": llama_mlp, "gemma_mlp": gemma_mlp, "bert_mlp": bert_mlp, "gemm_mlp": gemm_mlp}


def _data(seed: int = 0, rows: int = 400, k: int = 12, out: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(k, k))  # correlated channels, so the kept ones can stand in for the removed ones
    x = rng.normal(size=(rows, k)) @ mix + rng.normal(size=k)  # a non-zero mean, which the bias must absorb
    return x, rng.normal(size=(out, k)), rng.normal(size=out)


def _moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.T @ x / len(x), x.mean(axis=0)


KEPT = np.array([0, 2, 3, 5, 8, 9, 11])


def test_without_bias_equals_lstsq_on_the_kept_inputs() -> None:
    x, w, _ = _data()
    gram, _ = _moments(x)
    got = refit(w, gram, None, KEPT, percdamp=0.0)
    want = np.linalg.lstsq(x[:, KEPT], x @ w.T, rcond=None)[0].T
    np.testing.assert_allclose(got.weight, want, rtol=1e-8, atol=1e-9)
    assert not got.bias_delta.any()


def test_with_bias_equals_lstsq_on_augmented_inputs() -> None:
    x, w, b = _data(1)
    gram, mean = _moments(x)
    got = refit(w, gram, mean, KEPT, percdamp=0.0)
    augmented = np.concatenate([x[:, KEPT], np.ones((len(x), 1))], axis=1)
    solution = np.linalg.lstsq(augmented, x @ w.T + b, rcond=None)[0].T
    np.testing.assert_allclose(got.weight, solution[:, :-1], rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(b + got.bias_delta, solution[:, -1], rtol=1e-8, atol=1e-9)


def test_damping_is_a_ridge_around_the_kept_weights() -> None:
    """With λ > 0 the result minimises ‖Wx - Ŵx_S - Δb‖²/n + λ‖Ŵ - W_S‖²: an augmented lstsq says the same."""
    x, w, _ = _data(2)
    gram, mean = _moments(x)
    got = refit(w, gram, mean, KEPT, percdamp=0.05)
    lam = got.damping
    assert lam == pytest.approx(0.05 * np.mean(np.diag(gram)))
    n = len(x)
    design = np.concatenate([x[:, KEPT], np.ones((n, 1))], axis=1) / np.sqrt(n)
    ridge = np.concatenate([np.sqrt(lam) * np.eye(len(KEPT)), np.zeros((len(KEPT), 1))], axis=1)
    target = np.concatenate([(x @ w.T) / np.sqrt(n), np.sqrt(lam) * w[:, KEPT].T])
    solution = np.linalg.lstsq(np.concatenate([design, ridge]), target, rcond=None)[0].T
    np.testing.assert_allclose(got.weight, solution[:, :-1], rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(got.bias_delta, solution[:, -1], rtol=1e-8, atol=1e-9)


def test_removing_zero_weights_changes_nothing_whatever_the_damping() -> None:
    x, w, _ = _data(3)
    removed = np.setdiff1d(np.arange(w.shape[1]), KEPT)
    w[:, removed] = 0.0
    gram, mean = _moments(x)
    got = refit(w, gram, mean, KEPT, percdamp=0.1)
    np.testing.assert_allclose(got.weight, w[:, KEPT], atol=1e-12)
    np.testing.assert_allclose(got.bias_delta, 0.0, atol=1e-12)


def test_never_worse_than_flap_and_output_error_matches_the_activations() -> None:
    x, w, _ = _data(4)
    gram, mean = _moments(x)
    removed = np.setdiff1d(np.arange(w.shape[1]), KEPT)
    got = refit(w, gram, mean, KEPT, percdamp=0.0)
    fold = flap_bias(w.T[:, :, None], mean, removed)  # FLAP: kept weights unchanged, the mean into the bias
    direct = float(np.sum((x @ w.T - x[:, KEPT] @ got.weight.T - got.bias_delta) ** 2) / len(x))
    assert output_error(w, gram, mean, KEPT, got.weight, got.bias_delta) == pytest.approx(direct, rel=1e-8)
    flap_error = output_error(w, gram, mean, KEPT, w[:, KEPT], fold)
    assert direct < 0.5 * flap_error  # correlated inputs: the kept channels reproduce much of the removed ones


def test_a_channel_the_data_never_saw_keeps_its_weight() -> None:
    x, w, _ = _data(5)
    x[:, 3] = 0.0  # kept, but dead: G_33 = 0 makes G_SS singular without damping
    gram, mean = _moments(x)
    got = refit(w, gram, mean, KEPT, percdamp=0.01)
    np.testing.assert_allclose(got.weight[:, list(KEPT).index(3)], w[:, 3], atol=1e-12)
    assert np.isfinite(got.weight).all()


# ---------------------------------------------------------------- end to end: shrink with the refit


def _consumer(net: Net) -> str:
    return next(k for k in net.channel_axes if k in ("down", "w2"))


def _zeroed(net: Net, units: list[int]) -> onnx.ModelProto:
    """The model with the consumer rows of ``units`` set to zero (their contribution is nothing already)."""
    model = onnx.ModelProto()
    model.CopyFrom(net.model)
    consumer = _consumer(net)
    for t in model.graph.initializer:
        if t.name == consumer:
            array = onnx.numpy_helper.to_array(t).copy()
            index = [slice(None)] * array.ndim
            index[net.channel_axes[consumer]] = units  # type: ignore[call-overload]
            array[tuple(index)] = 0
            t.CopyFrom(onnx.numpy_helper.from_array(array, t.name))
    return model


@pytest.mark.parametrize("kind", sorted(NETS))
def test_refit_that_removes_zero_channels_changes_nothing(kind: str) -> None:
    net = NETS[kind]()
    consumer = _consumer(net)
    width = net.weights[consumer].shape[net.channel_axes[consumer]]
    units = [1, 4, 7]
    model = _zeroed(net, units)
    calib = {k: np.concatenate([v] * 4) for k, v in net.feed.items()}
    m = ir.from_proto(model)
    config = ShrinkConfig(ratio=len(units) / width, method=StructuredMethod.FLAP, refit=True, damp=0.05)
    report = shrink_model(m, config, CalibrationRequest(data=calib, batch_size=4))
    (record,) = report.groups
    assert record.removed == units and record.refitted == 1  # zero rows score zero: they go first
    np.testing.assert_array_equal(run(ir.to_proto(m), net.feed)[0], run(model, net.feed)[0])


def _refitted_on_calibration(net: Net, method: StructuredMethod, seed: int) -> tuple[np.ndarray, np.ndarray, list]:
    """Remove 4 of ``net``'s 16 neurons with the undamped refit on seeded calibration rows: (the shrunk model's
    output rows, the calibration rows, the removed neurons)."""
    rng = np.random.default_rng(seed)
    calib = {"x": rng.standard_normal((8, 16, 8)).astype(np.float32)}
    m = ir.from_proto(net.model)
    config = ShrinkConfig(ratio=0.25, method=method, refit=True, damp=0.0)
    report = shrink_model(m, config, CalibrationRequest(data=calib, batch_size=4))
    (record,) = report.groups
    assert record.refitted == 1 and len(record.removed) == 4
    got = run(ir.to_proto(m), calib)[0].reshape(-1, 8)
    return got, calib["x"].reshape(-1, 8).astype(np.float64), record.removed


def _lstsq_output(h: np.ndarray, kept: np.ndarray, down: np.ndarray) -> np.ndarray:
    """numpy's least-squares fit of ``h @ down`` from the kept columns of ``h`` and a bias."""
    design = np.concatenate([h[:, kept], np.ones((len(h), 1))], axis=1)
    return design @ np.linalg.lstsq(design, h @ down, rcond=None)[0]


def test_refit_end_to_end_equals_lstsq_on_the_calibration_activations() -> None:
    net = llama_mlp(hidden=16)
    got, x, removed = _refitted_on_calibration(net, StructuredMethod.WANDA, 5500)
    kept = np.setdiff1d(np.arange(16), removed)
    w = {k: v.astype(np.float64) for k, v in net.weights.items()}
    h = silu(x @ w["gate"]) * (x @ w["up"])  # down's input, the refit's activations
    np.testing.assert_allclose(got, x + _lstsq_output(h, kept, w["down"]), rtol=1e-3, atol=1e-3)
    # and it reconstructs the dense output better than FLAP's fold on the same units
    flap = x + h[:, kept] @ w["down"][kept] + (h[:, removed] @ w["down"][removed]).mean(axis=0)
    dense = x + h @ w["down"]
    assert np.sum((got - dense) ** 2) < 0.9 * np.sum((flap - dense) ** 2)


def test_refit_of_a_gemma_block_equals_lstsq_on_down_inputs_under_the_post_norm() -> None:
    """Gemma 3's family: gated tanh-GELU, RMSNorm with (1 + w) before the MLP and after down. The refit solves for
    down's output (the post-norm's input), so the block equals numpy's lstsq there, pushed through the norm."""
    net = gemma_mlp(hidden=16)
    got, x, removed = _refitted_on_calibration(net, StructuredMethod.FLAP, 5501)
    kept = np.setdiff1d(np.arange(16), removed)
    w = {k: v.astype(np.float64) for k, v in net.weights.items()}
    norms = {t.name: onnx.numpy_helper.to_array(t) for t in net.model.graph.initializer}
    n = rms_norm(x, norms["pre_w"])
    h = gelu_tanh(n @ w["gate"]) * (n @ w["up"])  # down's input
    np.testing.assert_allclose(
        got, x + rms_norm(_lstsq_output(h, kept, w["down"]), norms["post_w"]), rtol=1e-3, atol=1e-3
    )
    dense = net.forward(net.weights, x)  # type: ignore[operator]
    flap_mlp = h[:, kept] @ w["down"][kept] + (h[:, removed] @ w["down"][removed]).mean(axis=0)
    assert np.sum((got - dense) ** 2) < np.sum((x + rms_norm(flap_mlp, norms["post_w"]) - dense) ** 2)


def test_refit_of_a_pointwise_conv_equals_lstsq_on_its_input_channels() -> None:
    rng = np.random.default_rng(5501)  # this function's own data, whatever ran before
    w = mobilenet_weights()
    calib = {"x": rng.standard_normal((16, CIN, HW, HW)).astype(np.float32)}
    m = ir.from_proto(mobilenet_block(w))
    config = ShrinkConfig(ratio=0.34, units=("channels",), refit=True, damp=0.0, allocate="uniform")
    report = shrink_model(m, config, CalibrationRequest(data=calib, batch_size=8))
    main = next(r for r in report.groups if r.units_before == C)
    assert main.refitted == 2 and len(main.removed) == 2  # c2, and se1 of the squeeze-excitation
    # numpy: c2's input channels as rows (every pixel of every image), least squares with a bias on the kept ones
    mp = block_np(w, calib["x"], last=False).astype(np.float64)
    kept = np.setdiff1d(np.arange(C), main.removed)
    rows = mp.transpose(0, 2, 3, 1).reshape(-1, C)
    design = np.concatenate([rows[:, kept], np.ones((len(rows), 1))], axis=1)
    solution = np.linalg.lstsq(design, rows @ w["c2"][:, :, 0, 0].T.astype(np.float64), rcond=None)[0]
    conv = next(n for n in m.graph if n.op_type == "Conv" and n.inputs[1].name == "c2")
    np.testing.assert_allclose(
        conv.inputs[1].const_value.numpy()[:, :, 0, 0], solution[:-1].T, rtol=1e-3, atol=1e-4
    )
    np.testing.assert_allclose(conv.inputs[2].const_value.numpy(), solution[-1], rtol=1e-3, atol=1e-4)


def test_refit_needs_data_and_is_on_by_default_with_it() -> None:
    net = llama_mlp()
    with pytest.raises(GraphpruneError, match="refit needs calibration data"):
        shrink_model(ir.from_proto(net.model), ShrinkConfig(ratio=0.25, refit=True))
    report = shrink_model(ir.from_proto(net.model), ShrinkConfig(ratio=0.25))
    assert not report.config.refit and report.config.allocate == "uniform"
    calib = CalibrationRequest(data={"x": net.feed["x"]}, batch_size=2)
    report = shrink_model(ir.from_proto(net.model), ShrinkConfig(ratio=0.25), calib)
    assert report.config.refit and report.config.allocate == "global" and report.groups[0].refitted == 1


@pytest.mark.parametrize("unit_size", [1, 3])
def test_removal_costs_equal_the_error_the_refit_leaves_per_unit(unit_size: int) -> None:
    x, w, _ = _data(6)
    gram, mean = _moments(x)
    costs = removal_costs(w, gram, mean, unit_size, percdamp=0.0)
    for u in range(w.shape[1] // unit_size):
        kept = np.setdiff1d(np.arange(w.shape[1]), np.arange(u * unit_size, (u + 1) * unit_size))
        solved = refit(w, gram, mean, kept, percdamp=0.0)
        error = output_error(w, gram, mean, kept, solved.weight, solved.bias_delta)
        assert costs[u] == pytest.approx(error, rel=1e-6)


def test_removal_costs_of_uncorrelated_channels_are_flaps_scores() -> None:
    rng = np.random.default_rng(8)
    x = rng.normal(size=(200_000, 6)) * np.arange(1, 7) + 3.0  # independent channels, a mean to ignore
    w = rng.normal(size=(4, 6))
    gram, mean = _moments(x)
    flap = x.var(axis=0) * (w**2).sum(axis=0)
    np.testing.assert_allclose(removal_costs(w, gram, mean, 1, percdamp=0.0), flap, rtol=2e-2)


def _refit_error(w: np.ndarray, gram: np.ndarray, mean: np.ndarray, removed: list[int], size: int) -> float:
    gone = np.concatenate([np.arange(u * size, (u + 1) * size) for u in removed])
    kept = np.setdiff1d(np.arange(w.shape[1]), gone)
    solved = refit(w, gram, mean, kept, percdamp=0.0)
    return output_error(w, gram, mean, kept, solved.weight, solved.bias_delta)


@pytest.mark.parametrize("unit_size", [1, 3])
def test_greedy_walk_removes_units_in_the_order_of_an_exhaustive_greedy_refit(unit_size: int) -> None:
    x, w, _ = _data(11, k=24)
    gram, mean = _moments(x)
    order = np.argsort(greedy_costs([(w, gram, mean)], [unit_size], percdamp=0.0))
    gone: list[int] = []
    for _ in range(24 // unit_size - 1):  # each step: the unit whose exact refit (numpy, every subset) costs least
        left = [u for u in range(24 // unit_size) if u not in gone]
        gone.append(min(left, key=lambda u: _refit_error(w, gram, mean, [*gone, u], unit_size)))
    assert order[: len(gone)].tolist() == gone


def test_greedy_walk_sums_the_consumers_and_stops_after_its_steps() -> None:
    x, w, _ = _data(12, k=12)
    gram, mean = _moments(x)
    w2 = np.random.default_rng(3).normal(size=(7, 24))  # a second consumer reading the same units, 2 channels each
    x2 = np.repeat(x, 2, axis=1) + 0.1 * np.random.default_rng(4).normal(size=(len(x), 24))
    gram2, mean2 = _moments(x2)
    scores = greedy_costs([(w, gram, mean), (w2, gram2, mean2)], [1, 2], percdamp=0.0, steps=4)
    first = min(
        range(12), key=lambda u: _refit_error(w, gram, mean, [u], 1) + _refit_error(w2, gram2, mean2, [u], 2)
    )
    assert int(np.argmin(scores)) == first
    order = np.argsort(scores)
    assert np.all(np.diff(scores[order]) > 0)  # strictly increasing: lowest-first selection follows the walk
    both = _refit_error(w, gram, mean, order[:4].tolist(), 1) + _refit_error(
        w2, gram2, mean2, order[:4].tolist(), 2
    )
    assert scores[order[3]] <= both + 1e-9  # a step's cost is the increase of the joint error, at most the total


def test_obs_removes_a_duplicated_neuron_and_the_refit_restores_the_output_exactly() -> None:
    rng = np.random.default_rng(5502)  # this function's own data, whatever ran before
    net = llama_mlp(hidden=12)
    for name in ("gate", "up"):  # neuron 7 computes exactly what neuron 2 computes
        net.weights[name][:, 7] = net.weights[name][:, 2]
    model = make_model(
        list(net.model.graph.node),
        list(net.model.graph.input),
        list(net.model.graph.output),
        [init(v, k) for k, v in net.weights.items()],
    )
    calib = {"x": rng.standard_normal((8, 16, 8)).astype(np.float32)}
    m = ir.from_proto(model)
    config = ShrinkConfig(ratio=1 / 12, method=StructuredMethod.OBS, refit=True, damp=1e-9)
    report = shrink_model(m, config, CalibrationRequest(data=calib, batch_size=4))
    assert report.groups[0].removed in ([2], [7])  # FLAP would rank them like any other neuron
    np.testing.assert_allclose(run(ir.to_proto(m), net.feed)[0], run(model, net.feed)[0], rtol=1e-4, atol=1e-4)


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    return out


def test_sequential_refits_each_group_on_the_already_shrunk_prefix() -> None:
    rng = np.random.default_rng(5503)  # this function's own data, whatever ran before
    model, weights, _ = residual_stack(d=8, hidden=12)
    calib = {"x": rng.standard_normal((64, 8)).astype(np.float32)}
    request = CalibrationRequest(data=calib, batch_size=16)
    config = ShrinkConfig(ratio=0.25, method=StructuredMethod.FLAP, refit=True, damp=0.0, allocate="uniform")
    m = ir.from_proto(model)
    report = shrink_model(m, replace(config, sequential=True), request)
    small = ir.to_proto(m)
    # block 2's input on the shrunk model is what its refit saw: blocks 0 and 1 were shrunk before it
    x2 = run(_with_outputs(small, ["x2"]), calib)[-1].astype(np.float64)
    w1, w2 = (w.astype(np.float64) for w in weights[2])
    h = np.maximum(x2 @ w1, 0.0)
    kept = np.setdiff1d(np.arange(12), report.groups[2].removed)
    design = np.concatenate([h[:, kept], np.ones((len(h), 1))], axis=1)
    solution = np.linalg.lstsq(design, h @ w2, rcond=None)[0]
    got = next(t for t in small.graph.initializer if t.name == "w2_2")
    np.testing.assert_allclose(onnx.numpy_helper.to_array(got), solution[:-1], rtol=1e-3, atol=1e-4)
    # one-shot refits block 2 on the dense model's activations instead: another result
    one_shot = ir.from_proto(model)
    shrink_model(one_shot, config, request)
    dense_fit = next(t for t in ir.to_proto(one_shot).graph.initializer if t.name == "w2_2")
    assert not np.allclose(onnx.numpy_helper.to_array(dense_fit), onnx.numpy_helper.to_array(got), atol=1e-3)


def test_sequential_takes_no_steps() -> None:
    with pytest.raises(GraphpruneError, match="steps"):
        ShrinkConfig(ratio=0.25, sequential=True, steps=2).validate()


@pytest.mark.parametrize("stride", [1, 3])
def test_gram_taps_equal_numpy_on_every_nth_row(stride: int) -> None:
    rng = np.random.default_rng(5504)  # this function's own data, whatever ran before
    from graphprune.calibration.moments import ChannelTap, collect_moments

    net = llama_mlp(hidden=12)
    calib = {"x": rng.standard_normal((4, 10, 8)).astype(np.float32)}
    m = ir.from_proto(net.model)
    tap = ChannelTap("h", -1, 12, gram=True, gram_stride=stride)
    moments = collect_moments(m, [tap], [], CalibrationRequest(data=calib, batch_size=2))
    x = calib["x"].astype(np.float64)
    h = (silu(x @ net.weights["gate"]) * (x @ net.weights["up"])).reshape(2, -1, 12)  # per batch of 2 samples
    sample = np.concatenate([batch[::stride] for batch in h])  # each run's rows, every n-th
    gram, sums, rows = moments.gram_terms("h")
    np.testing.assert_allclose(gram, sample.T @ sample, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sums, sample.sum(axis=0), rtol=1e-4, atol=1e-4)
    assert rows == len(sample) and moments.rows["h"] == 40


@pytest.mark.parametrize("block", [4, 5])
def test_gram_from_blocks_of_the_upper_triangle_equals_numpy(block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import graphprune.calibration.gram_taps as gram_module
    import graphprune.calibration.moments as moments_module

    rng = np.random.default_rng(5505)  # this function's own data, whatever ran before
    monkeypatch.setattr(gram_module, "GRAM_BLOCK", block)  # 12 channels: 3 x 3 blocks of 4, 2 x 2 of 6
    assert len(gram_module.gram_blocks(12, 17)) == (6 if block == 4 else 3)
    net = llama_mlp(hidden=12)
    calib = {"x": rng.standard_normal((4, 10, 8)).astype(np.float32)}
    tap = moments_module.ChannelTap("h", -1, 12, gram=True)
    moments = moments_module.collect_moments(ir.from_proto(net.model), [tap], [], CalibrationRequest(data=calib))
    x = calib["x"].astype(np.float64)
    h = (silu(x @ net.weights["gate"]) * (x @ net.weights["up"])).reshape(-1, 12)
    np.testing.assert_allclose(moments.grams["h"], h.T @ h, rtol=1e-4, atol=1e-4)


def test_dense_target_refit_equals_numpy_least_squares_of_the_dense_output() -> None:
    rng = np.random.default_rng(5701)  # this function's own data, whatever ran before
    x_d, w, _ = _data(seed=11)
    x_s = x_d + 0.3 * rng.normal(size=x_d.shape) @ rng.normal(size=(12, 12)) / 4  # a perturbed (shrunk) prefix
    b = rng.normal(size=w.shape[0])
    kept = np.array([0, 2, 3, 5, 6, 8, 9, 11])
    n = len(x_s)
    gram, mean = x_s.T @ x_s / n, x_s.mean(axis=0)
    solved = refit(w, gram, mean, kept, 0.0, target=(x_d.T @ x_s / n, x_d.mean(axis=0)))
    design = np.concatenate([x_s[:, kept], np.ones((n, 1))], axis=1)
    reference = np.linalg.lstsq(design, x_d @ w.T + b, rcond=None)[0]  # W x_d + b ≈ Ŵ_S x_s + b̂
    np.testing.assert_allclose(solved.weight, reference[:-1].T, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(b + solved.bias_delta, reference[-1], rtol=1e-6, atol=1e-8)
    # with nothing shrunk upstream (x_d = x_s) the dense target is today's refit, damped or not
    for damp in (0.0, 0.1):
        same = refit(w, gram, mean, kept, damp, target=(gram, mean))
        today = refit(w, gram, mean, kept, damp)
        np.testing.assert_allclose(same.weight, today.weight, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(same.bias_delta, today.bias_delta, rtol=1e-9, atol=1e-10)


def test_dense_target_refit_without_the_dense_mean_is_refused() -> None:
    x, w, _ = _data(seed=12)
    gram, mean = x.T @ x / len(x), x.mean(axis=0)
    with pytest.raises(ValueError, match="dense input's mean"):
        refit(w, gram, mean, np.arange(6), 0.01, target=(gram, None))
