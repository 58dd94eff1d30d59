"""``apply --sequential --permute`` against a numpy reimplementation of the whole run.

Two LLaMA MLP blocks with residuals: block 2 is calibrated on block 1's pruned and permuted output, so the
permutation must be absorbed exactly (block 2 sees the function block 1 computes, not its channel order) and
each block's statistics must follow its own channels. The reference computes the sequential Wanda run in
float64 from the dense weights, with the channel order the file reveals; the search is checked to have used
Wanda's |W|·‖X‖, not |W|, and the file is audited for 2:4 along K in its stored layout.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper
from typer.testing import CliRunner

from graphprune.algorithms.pattern import NMPattern
from graphprune.algorithms.permutation import search_permutation
from graphprune.cli import app
from tests.onnx_builders import init, initializer, make_model, run, tensor
from tests.references import wanda_numpy

HIDDEN, INTER = 8, 16
PATTERN = NMPattern(2, 4)


def two_mlp_blocks() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """y = b2(b1(x)) with b(x) = x + down(silu(x gate) * (x up)), [K, N] MatMul weights."""
    rng = np.random.default_rng(202600)  # this function's own data, whatever ran before
    weights: dict[str, np.ndarray] = {}
    nodes = []
    x = "x"
    for b in (1, 2):
        gate, up, down = (
            rng.standard_normal(s).astype(np.float32) for s in ((HIDDEN, INTER),) * 2 + ((INTER, HIDDEN),)
        )
        # Channels of very different size, in runs: the in-order 2:4 groups of down's K lose a lot.
        gate *= np.repeat(np.array([3.0, 0.2, 1.0, 0.1], np.float32), INTER // 4)[None, :]
        weights.update({f"gate{b}": gate, f"up{b}": up, f"down{b}": down})
        out = f"y{b}" if b == 2 else f"r{b}"
        nodes += [
            helper.make_node("MatMul", [x, f"gate{b}"], [f"g{b}"]),
            helper.make_node("Sigmoid", [f"g{b}"], [f"sg{b}"]),
            helper.make_node("Mul", [f"g{b}", f"sg{b}"], [f"silu{b}"]),
            helper.make_node("MatMul", [x, f"up{b}"], [f"u{b}"]),
            helper.make_node("Mul", [f"silu{b}", f"u{b}"], [f"h{b}"]),
            helper.make_node("MatMul", [f"h{b}", f"down{b}"], [f"d{b}"]),
            helper.make_node("Add", [x, f"d{b}"], [out]),
        ]
        x = out
    model = make_model(
        nodes,
        [tensor("x", shape=["b", 3, HIDDEN])],
        [tensor("y2")],
        [init(w, name) for name, w in weights.items()],
    )
    return model, weights


def hidden(x: np.ndarray, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    g = x @ gate.astype(np.float64)
    return (
        g * 0.5 * (1 + np.tanh(g / 2)) * (x @ up.astype(np.float64))
    )  # silu, with a sigmoid that cannot overflow


def column_order(written: np.ndarray, reference: np.ndarray, atol: float = 0.0) -> np.ndarray:
    """The order o with written == reference[:, o] (to ``atol``; the columns are distinct)."""
    distance = np.abs(written[:, :, None] - reference[:, None, :]).max(axis=0)  # (written col, reference col)
    order = distance.argmin(axis=1)
    assert (distance[np.arange(len(order)), order] <= atol).all()
    return order


def kept(scores: np.ndarray, order: np.ndarray) -> float:
    """Independent 2:4 objective: per row, the two largest of every four consecutive reordered scores."""
    groups = np.sort(scores[:, order].reshape(scores.shape[0], -1, 4), axis=-1)
    return float(groups[..., 2:].sum())


def audit_nm_along_axis0(weight: np.ndarray, keep: int = 2, group: int = 4) -> int:
    """Groups of ``group`` consecutive rows (MatMul B's K axis) with more than ``keep`` non-zeros, per column."""
    k, n = weight.shape
    return int((np.count_nonzero(weight.reshape(k // group, group, n), axis=1) > keep).sum())


@pytest.fixture
def pruned(tmp_path):
    rng = np.random.default_rng(202601)  # this function's own data, whatever ran before
    model, weights = two_mlp_blocks()
    path, out = tmp_path / "mlp2.onnx", tmp_path / "pruned.onnx"
    onnx.save(model, str(path))
    x = rng.standard_normal((6, 3, HIDDEN)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    args = ["apply", str(path), "--nm", "2:4", "--method", "wanda", "--calib", str(tmp_path / "calib.npz")]
    args += ["--sequential", "--permute", "--include-head", "-o", str(out), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out, weights, x, json.loads(result.stdout), path


def test_sequential_permuted_wanda_equals_the_numpy_run_and_onnxruntime(pruned) -> None:
    out, weights, x, summary, _ = pruned
    written = onnx.load(str(out))
    feed = x.reshape(-1, HIDDEN).astype(np.float64)
    reference: dict[str, np.ndarray] = {}
    for b in (1, 2):
        gate, up, down = weights[f"gate{b}"], weights[f"up{b}"], weights[f"down{b}"]
        # Block mode: the whole block is calibrated on its (already pruned) input, then pruned.
        h = hidden(feed, gate, up)
        gate_p, up_p = wanda_numpy(gate, feed), wanda_numpy(up, feed)
        order = column_order(initializer(written, f"gate{b}"), gate_p)
        assert sorted(order.tolist()) == list(range(INTER)) and order.tolist() != list(range(INTER))
        # The search ran on Wanda's scores of down (rows = output neurons, K = the intermediate channels): the
        # order keeps about what a search on them keeps (the search is a local one: float32 statistics may
        # lead it to another, equally good optimum), and more of Wanda's importance than |W| alone finds.
        norms = np.sqrt((h**2).sum(axis=0))
        wanda = np.abs(down.T.astype(np.float64)) * norms[None, :]
        best = search_permutation(wanda, PATTERN)
        by_magnitude = search_permutation(np.abs(down.T), PATTERN).order
        assert kept(wanda, order) >= 0.99 * best.kept
        assert kept(wanda, order) > kept(wanda, by_magnitude) > best.identity_kept
        reference[f"gate{b}"], reference[f"up{b}"] = gate_p[:, order], up_p[:, order]
        reference[f"down{b}"] = wanda_numpy(down[order], h[:, order])
        feed = feed + hidden(feed, reference[f"gate{b}"], reference[f"up{b}"]) @ reference[f"down{b}"]
    for name, expected in reference.items():
        np.testing.assert_array_equal(initializer(written, name), expected.astype(np.float32), err_msg=name)
        assert audit_nm_along_axis0(initializer(written, name)) == 0, name

    (y,) = run(written, {"x": x})  # ONNX Runtime on the written file = the numpy run's pruned model
    np.testing.assert_allclose(y.reshape(-1, HIDDEN), feed, rtol=1e-4, atol=1e-4)

    permuted = {g["reader"]: g for g in summary["permuted_groups"]}
    assert set(permuted) == {"down1", "down2"}
    for b in (1, 2):
        group = permuted[f"down{b}"]
        assert group["writers"] == [f"gate{b}", f"up{b}"] and group["kind"] == "mlp channels" and group["written"]
        assert group["kept_before"] < group["kept_after"] <= 1.0 and 0.0 < group["recovered"] <= 1.0


def test_graphprune_check_agrees_with_the_audit(pruned) -> None:
    out, *_ = pruned
    check = CliRunner().invoke(app, ["check", str(out), "--include-head", "--no-eligibility", "--json"])
    assert check.exit_code == 0, check.output
    report = json.loads(check.stdout)
    assert report["ok"] and {w["name"] for w in report["weights"]} == {
        f"{n}{b}" for n in ("gate", "up", "down") for b in (1, 2)
    }
    assert all(w["bad_groups"] == 0 and w["k_axis"] == 0 for w in report["weights"])


def test_the_input_file_is_left_as_it_was(pruned) -> None:
    _, weights, _, _, path = pruned
    for name, values in weights.items():
        np.testing.assert_array_equal(initializer(onnx.load(str(path)), name), values)


def test_the_table_lists_each_permuted_group_as_the_report_does(pruned, tmp_path) -> None:
    """Without --json, apply prints one row per group: reader, kind, importance kept before/after, recovered."""
    _, _, _, summary, path = pruned
    out = tmp_path / "again.onnx"
    args = ["apply", str(path), "--nm", "2:4", "--calib", str(tmp_path / "calib.npz"), "--sequential"]
    result = CliRunner(env={"COLUMNS": "80"}).invoke(app, [*args, "--permute", "--include-head", "-o", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "2 of 2" in next(line for line in lines if line.startswith("permuted groups"))
    report = json.loads(out.with_suffix(".report.json").read_text())["permuted_groups"]
    assert report == summary["permuted_groups"]  # the same run twice: the same orders, the same report
    for group in report:
        (row,) = [line.split() for line in lines if line.startswith(group["reader"] + " ")]
        percents = [f"{group[key]:.1%}" for key in ("kept_before", "kept_after", "recovered")]
        assert row == [group["reader"], "mlp", *percents]


@pytest.mark.parametrize("method", ["sparsegpt", "alps"])
def test_reconstructing_methods_prune_as_if_the_channels_had_been_reordered_beforehand(tmp_path, method) -> None:
    """SparseGPT and ALPS with --sequential --permute = the same method without --permute on the dense model
    whose channels were reordered first (the order read back from the file): the Gram matrices and Σx² the
    pass reorders equal those measured on the reordered model, and the file is 2:4 along K as stored."""
    rng = np.random.default_rng(202602)  # this function's own data, whatever ran before
    from graphprune.passes.permute import find_channel_groups, write_permutation

    model, _ = two_mlp_blocks()
    dense = tmp_path / "dense.onnx"
    onnx.save(model, str(dense))
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((6, 3, HIDDEN)).astype(np.float32))

    def apply(source, out, *extra):
        args = ["apply", str(source), "--nm", "2:4", "--method", method, "--calib", str(tmp_path / "calib.npz")]
        result = CliRunner().invoke(app, [*args, "--sequential", "--include-head", "-o", str(out), *extra])
        assert result.exit_code == 0, result.output
        return onnx.load(str(out))

    permuted = apply(dense, tmp_path / "permuted.onnx", "--permute")
    # gate's output columns are pruned one by one (rows of the (out, K) layout are independent), before the
    # permutation moves them: block b's order is read from them, against a run on the model whose blocks
    # before b are reordered (block b's input is then the same, to float rounding).
    reordered, expected = dense, apply(dense, tmp_path / "plain.onnx")
    ir_model = ir.load(str(dense))
    groups, weights = find_channel_groups(ir_model)
    for b in (1, 2):
        order = column_order(initializer(permuted, f"gate{b}"), initializer(expected, f"gate{b}"), 1e-5)
        assert order.tolist() != list(range(INTER))
        write_permutation(ir_model, groups[f"down{b}"], order, weights)
        reordered = tmp_path / f"reordered{b}.onnx"
        ir.save(ir_model, str(reordered))
        expected = apply(reordered, tmp_path / f"expected{b}.onnx")
    for name in (f"{n}{b}" for n in ("gate", "up", "down") for b in (1, 2)):
        got = initializer(permuted, name)
        np.testing.assert_allclose(got, initializer(expected, name), rtol=1e-4, atol=1e-5, err_msg=name)
        assert audit_nm_along_axis0(got) == 0, name
    x = rng.standard_normal((2, 3, HIDDEN)).astype(np.float32)
    np.testing.assert_allclose(run(permuted, {"x": x})[0], run(expected, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_segment_wise_run_writes_the_same_permuted_model_as_the_in_memory_run(pruned, tmp_path) -> None:
    """External data with --sequential runs segment by segment and streams each pruned weight into the output as
    it goes; a permutation chosen at down's turn reorders gate and up, written earlier, which must be reordered
    in the file too (they were left in their old order once, a silently wrong model)."""
    out, _, x, report, path = pruned
    assert any(g["written"] for g in report["permuted_groups"])
    external = tmp_path / "external" / "mlp2.onnx"
    external.parent.mkdir()
    onnx.save_model(
        onnx.load(str(path)),
        str(external),
        save_as_external_data=True,
        location="mlp2.onnx.data",
        size_threshold=0,
    )
    streamed = tmp_path / "external" / "pruned.onnx"
    args = ["apply", str(external), "--nm", "2:4", "--method", "wanda", "--calib", str(tmp_path / "calib.npz")]
    args += ["--sequential", "--permute", "--include-head", "-o", str(streamed), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert any(isinstance(v.const_value, ir.ExternalTensor) for v in ir.load(streamed).graph.initializers.values())

    def weights(p) -> dict[str, np.ndarray]:
        return {
            t.name: onnx.numpy_helper.to_array(t, base_dir=str(p.parent))
            for t in onnx.load(str(p)).graph.initializer
        }

    in_memory, segment_wise = weights(out), weights(streamed)
    assert in_memory.keys() == segment_wise.keys()
    for name, value in in_memory.items():
        np.testing.assert_array_equal(segment_wise[name], value, err_msg=name)
    np.testing.assert_array_equal(
        run(onnx.load(str(streamed)), {"x": x})[0], run(onnx.load(str(out)), {"x": x})[0]
    )


def test_permute_with_a_one_shot_segment_wise_run_is_refused_in_one_line(tmp_path) -> None:
    rng = np.random.default_rng(202603)  # this function's own data, whatever ran before
    model, _ = two_mlp_blocks()
    path = tmp_path / "mlp2.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="mlp2.onnx.data", size_threshold=0)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((4, 3, HIDDEN)).astype(np.float32))
    args = ["apply", str(path), "--nm", "2:4", "--calib", str(tmp_path / "calib.npz"), "--permute"]
    result = CliRunner().invoke(app, [*args, "--max-memory", "1GB", "-o", str(tmp_path / "o.onnx")])
    assert result.exit_code == 2
    assert "--permute" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()
