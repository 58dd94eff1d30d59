"""Channel permutations written into graphs: ONNX Runtime's output of the permuted dense model equals the
original's, and pruning with --permute leaves N:M along K in the stored layout of the written file."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphprune.algorithms.masks import nm_violations
from graphprune.algorithms.pattern import NMPattern
from graphprune.algorithms.scores import Method
from graphprune.passes.permute import find_channel_groups, write_permutation
from graphprune.passes.prune import PruneConfig, PrunePass
from tests.onnx_builders import attention as shared_attention
from tests.onnx_builders import bert_mlp as shared_bert_mlp
from tests.onnx_builders import initializer, run, tensor
from tests.onnx_builders import llama_mlp as shared_llama_mlp
from tests.references import wanda_numpy

PATTERN = NMPattern(2, 4)


def weight(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def llama_mlp() -> onnx.ModelProto:
    """The shared LLaMA MLP (``tests/onnx_builders.py``) with 16 intermediate channels: one 2:4 group of 16."""
    return shared_llama_mlp(d=8, hidden=16, seed=3100).model


def bert_mlp(layout: str = "gemm") -> onnx.ModelProto:
    return shared_bert_mlp(d=8, hidden=16, layout=layout, seed=3101).model


def attention(kv_heads: int) -> onnx.ModelProto:
    """The shared attention block: 4 heads of 8 channels over a 16-wide stream, ``kv_heads`` K/V heads."""
    return shared_attention(heads=4, kv_heads=kv_heads, head_dim=8, d=16, seed=3102)[0]


CASES = {
    "llama-mlp": (llama_mlp, {"down": (("gate", "up"), (), 16)}, (2, 3, 8)),
    "bert-mlp": (bert_mlp, {"w2": (("w1",), ("b1",), 16)}, (4, 8)),
    "exported-bert-mlp": (lambda: bert_mlp("exported"), {"w2": (("w1",), ("b1",), 16)}, (2, 3, 8)),
    "attention-mha": (lambda: attention(4), {"wo": (("wv",), (), 8)}, (2, 5, 16)),
    "attention-gqa": (lambda: attention(2), {"wo": (("wv",), (), 8)}, (2, 5, 16)),
}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_groups_are_found_and_a_permutation_keeps_the_outputs(case: str) -> None:
    rng = np.random.default_rng(3103)  # this function's own data, whatever ran before
    build, expected, x_shape = CASES[case]
    model = ir.from_proto(build())
    groups, weights = find_channel_groups(model)
    found = {g.reader: (g.writers, g.biases, g.period) for g in groups.values()}
    assert found == expected

    x = rng.standard_normal(x_shape).astype(np.float32)
    (before,) = run(model, {"x": x})
    for group in groups.values():
        order = rng.permutation(group.period)
        assert not np.array_equal(order, np.arange(group.period))
        write_permutation(model, group, order, weights)
    (after,) = run(model, {"x": x})
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def test_channels_read_outside_the_group_are_left_alone() -> None:
    proto = llama_mlp()
    proto.graph.output.append(tensor("silu"))  # the activation is also a model output: reordering it shows
    assert find_channel_groups(ir.from_proto(proto))[0] == {}


def test_the_residual_stream_is_not_a_group() -> None:
    """Q/K/V read the residual stream through a normalisation: no writer reaches them through exact ops."""
    groups, _ = find_channel_groups(ir.from_proto(attention(4)))
    assert set(groups) == {"wo"}


def test_prune_with_permute_keeps_more_importance_and_stored_nm(tmp_path) -> None:
    rng = np.random.default_rng(3104)  # this function's own data, whatever ran before
    from typer.testing import CliRunner

    from graphprune.cli import app

    model = llama_mlp()
    # Make the in-order groups of down's K bad: channels 0-7 important, 8-15 weak, so groups 0-1 lose a lot.
    down = initializer(model, "down").copy()
    down[8:] *= 0.05
    for t in model.graph.initializer:
        if t.name == "down":
            t.CopyFrom(onnx.numpy_helper.from_array(down, "down"))
    path = tmp_path / "mlp.onnx"
    onnx.save(model, str(path))
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((8, 3, 8)).astype(np.float32))
    out = tmp_path / "pruned.onnx"
    calib = str(tmp_path / "calib.npz")
    args = ["apply", str(path), "--nm", "2:4", "--calib", calib, "--permute", "--include-head", "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "pruned.report.json").read_text())
    (group,) = report["permuted_groups"]
    assert group["reader"] == "down" and group["writers"] == ["gate", "up"]
    assert group["kept_after"] > group["kept_before"]

    pruned = onnx.load(str(out))
    for name in ("gate", "up", "down"):  # MatMul B [K, N]: K is axis 0 in the stored layout
        assert nm_violations(initializer(pruned, name).T, PATTERN).size == 0
    check = CliRunner().invoke(app, ["check", str(out), "--include-head", "--no-eligibility"])
    assert check.exit_code == 0, check.output


def test_the_pass_reorders_the_statistics_with_the_weights() -> None:
    """Wanda with --permute equals Wanda 2:4 of the reordered dense weight on the reordered activations."""
    rng = np.random.default_rng(3105)  # this function's own data, whatever ran before
    model = ir.from_proto(llama_mlp())
    original = {name: initializer(model, name) for name in ("gate", "up", "down")}
    x = rng.standard_normal((16, 8))
    h = _hidden(original, x)  # the dense MLP's intermediate activations, original order
    stats = SimpleNamespace(sumsq={"down": (h**2).sum(axis=0)}, gram={})
    config = PruneConfig(PATTERN, method=Method.WANDA, include=("down",), include_head=True, permute=True)
    (report,) = PrunePass(config=config, stats=stats)(model).pruned
    assert report.permutation is not None and report.permutation["kept_after"] > report.permutation["kept_before"]

    gate = initializer(model, "gate")  # the order written, read back from gate's columns
    order = [int(np.flatnonzero((original["gate"] == gate[:, [j]]).all(axis=0))[0]) for j in range(16)]
    assert sorted(order) != order and sorted(order) == list(range(16))
    np.testing.assert_array_equal(initializer(model, "up"), original["up"][:, order])
    expected = wanda_numpy(original["down"][order], h[:, order])
    np.testing.assert_array_equal(initializer(model, "down"), expected.astype(np.float32))


def _hidden(weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    g = x @ weights["gate"].astype(np.float64)
    return g / (1 + np.exp(-g)) * (x @ weights["up"].astype(np.float64))


@pytest.mark.parametrize("method", list(Method), ids=lambda m: m.value)
def test_the_search_scores_with_the_methods_importance(method: Method) -> None:
    """The shares the report gives are those of |W|·‖X‖ (Wanda's score, SparseGPT's and ALPS's saliency) when
    the method is calibrated, of |W| for magnitude: recomputed here from the weights and activations."""
    rng = np.random.default_rng(3106)  # this function's own data, whatever ran before
    model = ir.from_proto(llama_mlp())
    original = {name: initializer(model, name) for name in ("gate", "up", "down")}
    h = _hidden(original, rng.standard_normal((16, 8)))
    h[:, :4] *= 20.0  # loud channels side by side: Wanda's order differs from |W|'s
    stats = SimpleNamespace(sumsq={"down": (h**2).sum(axis=0)}, gram={"down": h.T @ h})
    config = PruneConfig(PATTERN, method=method, include=("down",), include_head=True, permute=True)
    (report,) = PrunePass(config=config, stats=stats)(model).pruned
    norms = np.ones(16) if method is Method.MAGNITUDE else np.sqrt((h**2).sum(axis=0))
    scores = np.abs(original["down"].T.astype(np.float64)) * norms  # (out, K)
    kept_in_order = np.sort(scores.reshape(8, 4, 4), axis=-1)[..., 2:].sum() / scores.sum()
    assert report.permutation["kept_before"] == pytest.approx(kept_in_order, abs=2e-6)
    assert report.permutation["kept_after"] > report.permutation["kept_before"]
