"""Interleaved timing: the order the runs are called in, and the medians and ratios it reports (a fake clock)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from graphprune.errors import GraphpruneError
from graphprune.evaluate.timing import compare_models, compare_runs, interleave, synthetic_feed
from tests.onnx_builders import init, make_model, tensor


class FakeMachine:
    """A clock that only moves when a run says so: run ``i`` in call ``n`` takes ``costs[i][n]`` seconds of wall
    time and twice that of CPU time (two busy threads), and every call is logged."""

    def __init__(self, costs: list[list[float]]) -> None:
        self.costs = costs
        self.calls: list[int] = []
        self.wall = self.cpu = 0.0

    def clock(self) -> tuple[float, float]:
        return self.wall, self.cpu

    def run(self, index: int):  # type: ignore[no-untyped-def]
        def call() -> None:
            spent = self.costs[index][self.calls.count(index)]
            self.calls.append(index)
            self.wall += spent
            self.cpu += 2 * spent

        return call


def test_each_run_is_warmed_once_then_the_rounds_alternate() -> None:
    machine = FakeMachine([[9.0, 1, 2, 3], [9.0, 4, 5, 6], [9.0, 7, 8, 9]])
    durations = interleave([machine.run(i) for i in range(3)], rounds=3, clock=machine.clock)
    assert machine.calls == [0, 1, 2] + [0, 1, 2] * 3
    # the warm-up call (9 s) is not timed; each round's own cost is
    assert durations == [[(c, 2 * c) for c in costs[1:]] for costs in machine.costs]


def test_medians_and_speedups_against_the_first_run() -> None:
    rng = np.random.default_rng(0)
    costs = [list(rng.uniform(1, 2, 6)), list(rng.uniform(0.3, 0.6, 6))]
    machine = FakeMachine(costs)
    result = compare_runs(["dense", "int8"], [machine.run(0), machine.run(1)], rounds=5, clock=machine.clock)
    dense, int8 = (float(np.median(c[1:])) for c in costs)
    assert [t.name for t in result.timings] == ["dense", "int8"]
    assert result.timings[0].wall_s == pytest.approx(dense)
    assert result.timings[1].cpu_s == pytest.approx(2 * int8)
    assert result.speedup(1) == pytest.approx(dense / int8)
    assert result.speedup(0) == 1.0
    rows = result.to_dict()["models"]
    assert rows[1]["speedup"] == pytest.approx(dense / int8, abs=1e-3)
    assert rows[1]["cpu_speedup"] == pytest.approx(dense / int8, abs=1e-3)


def test_a_round_count_below_one_is_refused() -> None:
    with pytest.raises(GraphpruneError, match="rounds"):
        interleave([lambda: None], rounds=0)


def embedding_model(vocab: int) -> object:
    """ids -> Gather(table) -> ReduceMean: a text model with a dynamic batch and sequence."""
    table = np.arange(vocab * 4, dtype=np.float32).reshape(vocab, 4)
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["h"]),
        helper.make_node("ReduceMean", ["h"], ["y"], axes=[2], keepdims=0),
    ]
    inputs = [tensor("input_ids", TensorProto.INT64, ["batch", "sequence"])]
    return make_model(nodes, inputs, [tensor("y", shape=["batch", "sequence"])], [init(table, "table")])


def test_synthetic_feed_has_one_sample_of_seqlen_ids_inside_the_table(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import onnx

    onnx.save(embedding_model(vocab=7), tmp_path / "m.onnx")
    feed = synthetic_feed(tmp_path / "m.onnx", seqlen=33)
    assert list(feed) == ["input_ids"]
    ids = feed["input_ids"]
    assert ids.shape == (1, 33) and ids.dtype == np.int64
    assert ids.min() >= 0 and ids.max() < 7


def test_compare_models_runs_each_model_on_the_feed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import onnx

    # only the first model reads attention_mask: ONNX Runtime refuses a feed entry the second does not declare
    onnx.save(embedding_model(vocab=7), tmp_path / "a.onnx")
    model = embedding_model(vocab=7)
    model.graph.input.append(tensor("attention_mask", TensorProto.INT64, ["batch", "sequence"]))
    model.graph.node.append(helper.make_node("Identity", ["attention_mask"], ["mask_out"]))
    model.graph.output.append(tensor("mask_out", TensorProto.INT64, ["batch", "sequence"]))
    onnx.save(model, tmp_path / "b.onnx")
    ids = np.array([[1, 2, 3]], np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    result = compare_models([tmp_path / "b.onnx", tmp_path / "a.onnx"], feed, rounds=2)
    assert [t.name for t in result.timings] == [str(tmp_path / "b.onnx"), str(tmp_path / "a.onnx")]
    assert all(t.wall_s > 0 and t.cpu_s >= 0 for t in result.timings)


def test_eval_speed_reports_both_models_and_the_ratio_of_their_medians(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    import onnx
    from typer.testing import CliRunner

    from graphprune.cli import app
    from tests.bigram import VOCAB, bigram_model

    rng = np.random.default_rng(1)
    for name in ("dense", "pruned"):
        onnx.save(bigram_model(rng.standard_normal((VOCAB, VOCAB)), with_mask=True), tmp_path / f"{name}.onnx")
    np.savez(
        tmp_path / "heldout.npz",
        input_ids=rng.integers(0, VOCAB, (2, 5)),
        attention_mask=np.ones((2, 5), np.int64),
    )
    dense, pruned, calib = (str(tmp_path / n) for n in ("dense.onnx", "pruned.onnx", "heldout.npz"))
    result = CliRunner().invoke(app, ["eval", dense, pruned, "--calib", calib, "--speed", "3", "--json"])
    assert result.exit_code == 0, result.output
    speed = json.loads(result.stdout)["speed"]
    assert speed["rounds"] == 3 and [row["model"] for row in speed["models"]] == [dense, pruned]
    base, other = speed["models"]
    assert base["speedup"] == 1.0
    assert other["speedup"] == pytest.approx(base["wall_s"] / other["wall_s"], rel=2e-3)

    refused = CliRunner().invoke(app, ["eval", dense, pruned, "--calib", calib, "--speed", "-1"])
    assert refused.exit_code == 2 and "--speed" in refused.output and "Traceback" not in refused.output
    assert refused.output.strip().count("\n") == 0
