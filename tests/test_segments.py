"""Segment-wise pruning of external-data models: the same weights as the in-memory engines, within a budget."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from graphprune.algorithms.pattern import NMPattern
from graphprune.algorithms.scores import Method
from graphprune.cli import app
from graphprune.errors import GraphpruneError
from graphprune.graph.model_io import load_model, to_proto, uses_external_data
from graphprune.passes.prune import PruneConfig, PrunePass
from graphprune.pipeline.boundary import BoundaryTensors, parse_memory_size
from graphprune.pipeline.files import prune_file
from graphprune.pipeline.progress import PruneProgress, SegmentProgress
from graphprune.pipeline.segments import prune_in_segments
from graphprune.pipeline.sequential import prune_sequentially
from tests.decoder_models import VOCAB, decoder_like, feeds, request, save_external, weights_of
from tests.onnx_builders import initializer, run

WANDA = PruneConfig(NMPattern(2, 4), method=Method.WANDA)


@pytest.fixture
def external_model(tmp_path: Path) -> Path:
    return save_external(decoder_like(), tmp_path / "in" / "model.onnx")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Seen(PruneProgress):
    """The segments and weights a run reports; ``fail_at``: raise this error at the n-th weight."""

    def __init__(self, fail_at: tuple[int, BaseException] | None = None) -> None:
        self.segments: list[SegmentProgress] = []
        self.weights: list[str] = []
        self.fail_at = fail_at

    def segment_done(self, step: SegmentProgress) -> None:
        self.segments.append(step)

    def weight_pruned(self, name: str) -> None:
        self.weights.append(name)
        if self.fail_at is not None and len(self.weights) == self.fail_at[0]:
            raise self.fail_at[1]


def segment_run(
    path: Path, out: Path, data: list, sequential: str | None, max_memory: int | None = None, progress=None
):
    model = load_model(path)  # its weights are read lazily
    assert uses_external_data(model)
    plan = PrunePass(config=WANDA).plan(model)
    return prune_in_segments(
        model, path.parent, out, WANDA, request(data, max_memory), sequential, plan, progress=progress or Seen()
    )


@pytest.mark.parametrize("sequential", ["block", "level"])
def test_segments_prune_exactly_as_the_in_memory_sequential_engine(external_model: Path, sequential: str) -> None:
    rng = np.random.default_rng(1402)  # this function's own data, whatever ran before
    data = feeds()
    reference = load_model(external_model)
    batches, _ = request(data).batches(to_proto(reference))
    expected, _ = prune_sequentially(reference, WANDA, batches, sequential=sequential)
    reference = to_proto(reference)
    before = digest(external_model.with_name("model.onnx.data"))

    out = external_model.parent.parent / "out" / "pruned.onnx"
    result, warnings, memory = segment_run(external_model, out, data, sequential)

    assert warnings == [] and memory.spilled_bytes == 0
    assert (
        [w.name for w in result.pruned]
        == [w.name for w in expected.pruned]
        == ["a1", "a2", "a3", "b1", "b2", "b3"]
    )
    got = weights_of(out)
    for tensor_ in reference.graph.initializer:  # pruned ones equal bit for bit, the dense ones copied unchanged
        np.testing.assert_array_equal(got[tensor_.name], initializer(reference, tensor_.name))
    assert digest(external_model.with_name("model.onnx.data")) == before  # the input is never modified
    # the output keeps its weights in its own data file and runs like the in-memory result
    assert {
        e.value
        for t in onnx.load(str(out), load_external_data=False).graph.initializer
        for e in t.external_data
        if e.key == "location"
    } == {"pruned.onnx.data"}
    ids = {"input_ids": rng.integers(0, VOCAB, size=(1, 7), dtype=np.int64)}
    np.testing.assert_array_equal(run(to_proto(load_model(out)), ids)[0], run(reference, ids)[0])
    assert sorted(p.name for p in out.parent.iterdir()) == ["pruned.onnx", "pruned.onnx.data"]


def test_oneshot_segments_equal_todays_one_shot_calibration(tmp_path: Path, external_model: Path) -> None:
    data = feeds()
    inline = tmp_path / "inline.onnx"
    onnx.save_model(decoder_like_copy(external_model), str(inline))
    prune_file(inline, WANDA, tmp_path / "oneshot.onnx", calibration=request(data))

    segment_run(external_model, tmp_path / "segments.onnx", data, None)

    expected, got = weights_of(tmp_path / "oneshot.onnx"), weights_of(tmp_path / "segments.onnx")
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
    # and it is one-shot: block 2 scored on the dense block 1, which the sequential run does not do
    sequential = tmp_path / "sequential.onnx"
    segment_run(external_model, sequential, data, "block")
    assert not np.array_equal(weights_of(sequential)["a2"], got["a2"])


def decoder_like_copy(path: Path) -> onnx.ModelProto:
    return to_proto(load_model(path))  # the same weights, loaded whole: saved inline it runs one-shot as today


@pytest.mark.parametrize("sequential", ["block", None], ids=["block", "one-shot"])
def test_spilled_and_unspilled_runs_write_the_same_model(
    tmp_path: Path, external_model: Path, sequential: str | None
) -> None:
    data = feeds()
    segment_run(external_model, tmp_path / "memory.onnx", data, sequential)
    _, warnings, memory = segment_run(external_model, tmp_path / "disk.onnx", data, sequential, max_memory=1)

    assert memory.budget_bytes == 0 and memory.peak_held_bytes == 0  # the budget holds by construction
    assert "input_ids" in memory.spilled and "h1" in memory.spilled and memory.spilled_bytes > 0
    assert any("spilled to disk" in w for w in warnings)
    assert (tmp_path / "memory.onnx.data").read_bytes() == (tmp_path / "disk.onnx.data").read_bytes()


def test_boundary_tensors_stay_within_their_budget_and_read_back_spilled_ones() -> None:
    rng = np.random.default_rng(1403)  # this function's own data, whatever ran before
    arrays = [rng.standard_normal((4, 8)).astype(np.float32) for _ in range(5)]  # 128 bytes each
    store = BoundaryTensors(budget=300)
    for i, array in enumerate(arrays):
        store.append(f"t{i % 2}", array)
        assert store.held_bytes <= 300
    assert store.peak_held_bytes == 256 and store.spilled_bytes == 3 * 128 and store.spilled == {"t0", "t1"}
    for i, array in enumerate(arrays):
        np.testing.assert_array_equal(store.get(f"t{i % 2}", i // 2), array)
    spill_dir = store._dir
    assert spill_dir is not None and len(list(spill_dir.iterdir())) == 3
    store.drop("t0")
    assert store.held_bytes == 128 and len(list(spill_dir.iterdir())) == 1
    store.close()
    assert not spill_dir.exists() and store.names() == []


def test_progress_reports_each_segment_with_tokens_and_memory(tmp_path: Path, external_model: Path) -> None:
    seen = Seen()
    segment_run(external_model, tmp_path / "out.onnx", feeds(), "block", progress=seen)
    assert [(p.done, p.total) for p in seen.segments] == [(1, 3), (2, 3), (3, 3)]
    assert all(p.tokens_per_second and p.tokens_per_second > 0 for p in seen.segments)
    assert all(p.memory_bytes > 0 and p.spilled_bytes == 0 for p in seen.segments)


def test_an_interrupted_run_leaves_nothing_behind(tmp_path: Path, external_model: Path) -> None:
    out = tmp_path / "out" / "pruned.onnx"
    out.parent.mkdir()
    spill_dirs = set(Path(__import__("tempfile").gettempdir()).glob("graphprune-spill-*"))
    with pytest.raises(KeyboardInterrupt):
        segment_run(external_model, out, feeds(), "block", max_memory=1, progress=Seen((3, KeyboardInterrupt())))
    assert list(out.parent.iterdir()) == []  # no model, no data file, no staging directory
    assert set(Path(__import__("tempfile").gettempdir()).glob("graphprune-spill-*")) == spill_dirs


def test_a_failed_run_removes_the_folders_it_made_for_its_output(tmp_path: Path, external_model: Path) -> None:
    out = tmp_path / "new" / "deeper" / "pruned.onnx"

    with pytest.raises(GraphpruneError, match="stop"):
        prune_file(
            external_model,
            WANDA,
            out,
            calibration=request(feeds()),
            sequential="block",
            progress=Seen((1, GraphpruneError("stop"))),
        )
    assert not (tmp_path / "new").exists()
    prune_file(external_model, WANDA, out, calibration=request(feeds()), sequential="block")
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "pruned.onnx",
        "pruned.onnx.data",
        "pruned.report.json",
    ]


def test_prune_file_runs_external_models_segment_wise(tmp_path: Path, external_model: Path) -> None:
    data = feeds()
    reference = load_model(external_model)
    batches, _ = request(data).batches(to_proto(reference))
    prune_sequentially(reference, WANDA, batches)
    seen = Seen()

    out, result = prune_file(
        external_model, WANDA, tmp_path / "p.onnx", calibration=request(data), sequential="block", progress=seen
    )

    assert len(result.pruned) == 6 and len(seen.segments) == 3 and (tmp_path / "p.report.json").exists()
    got = weights_of(out)
    for name in ("a1", "b3", "head", "embed"):
        np.testing.assert_array_equal(got[name], initializer(reference, name))


def test_a_users_data_file_of_the_outputs_name_survives_a_segment_wise_run(
    tmp_path: Path, external_model: Path
) -> None:
    """The output's data file gets the one writer's fresh name; the user's ``pruned.onnx.data`` is not touched."""
    data = feeds()
    reference, _ = prune_file(
        external_model, WANDA, tmp_path / "ref.onnx", calibration=request(data), sequential="block"
    )
    out = tmp_path / "out" / "pruned.onnx"
    out.parent.mkdir()
    users = out.with_name("pruned.onnx.data")
    users.write_bytes(b"the user's own file")

    prune_file(external_model, WANDA, out, calibration=request(data), sequential="block")

    assert users.read_bytes() == b"the user's own file"
    proto = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"pruned.onnx.1.data"}
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "pruned.onnx",
        "pruned.onnx.1.data",
        "pruned.onnx.data",
        "pruned.report.json",
    ]
    expected, got = weights_of(reference), weights_of(out)
    assert expected.keys() == got.keys()
    for name, weight in expected.items():
        np.testing.assert_array_equal(got[name], weight)
    ids = feeds()[0]
    np.testing.assert_allclose(run(onnx.load(str(out)), ids)[0], run(onnx.load(str(reference)), ids)[0])


def test_a_failed_segment_wise_run_over_an_existing_output_keeps_it_whole(
    tmp_path: Path, external_model: Path
) -> None:
    """--force over an earlier output: a failure leaves the old model and its data as they were, a success
    replaces both and removes the old data file."""
    data = feeds()
    out = tmp_path / "pruned.onnx"
    prune_file(external_model, WANDA, out, calibration=request(data), sequential="block")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}

    with pytest.raises(GraphpruneError, match="stop"):
        prune_file(
            external_model,
            WANDA,
            out,
            calibration=request(data),
            sequential="level",
            force=True,
            progress=Seen((1, GraphpruneError("stop"))),
        )
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "in"} == before

    prune_file(external_model, WANDA, out, calibration=request(data), sequential="level", force=True)
    names = sorted(p.name for p in tmp_path.iterdir() if p.name != "in")
    assert names == ["pruned.onnx", "pruned.onnx.1.data", "pruned.report.json"]  # the old data file is gone
    expected = load_model(external_model)
    batches, _ = request(data).batches(to_proto(expected))
    prune_sequentially(expected, WANDA, batches, sequential="level")
    got = weights_of(out)
    for name in ("a1", "b3"):
        np.testing.assert_array_equal(got[name], initializer(expected, name))


@pytest.mark.parametrize("text", ["8GB", "8 gb", "512MB", "1.5GiB", "100"])
def test_memory_sizes_parse_with_units(text: str) -> None:
    expected = {"8GB": 8e9, "8 gb": 8e9, "512MB": 512e6, "1.5GiB": 1.5 * 2**30, "100": 100}[text]
    assert parse_memory_size(text) == int(expected)


@pytest.mark.parametrize("text", ["", "GB", "-1GB", "8XB", "eight", "0", "inf"])
def test_bad_memory_sizes_are_one_line_errors(text: str) -> None:
    with pytest.raises(GraphpruneError, match="`max_memory`"):
        parse_memory_size(text)


def test_cli_max_memory(tmp_path: Path, external_model: Path) -> None:
    calib = tmp_path / "calib.npz"
    np.savez(calib, input_ids=np.concatenate([f["input_ids"] for f in feeds()]))
    runner = CliRunner()
    bad = runner.invoke(app, ["apply", str(external_model), "--calib", str(calib), "--max-memory", "lots"])
    assert bad.exit_code == 2 and "--max-memory 'lots'" in bad.output and "Traceback" not in bad.output
    assert not external_model.with_name("model.pruned.onnx").exists()

    args = ["apply", str(external_model), "--calib", str(calib), "--batch-size", "2", "--sequential"]
    spilled = runner.invoke(app, [*args, "--max-memory", "1KB", "-o", str(tmp_path / "small.onnx")])
    plain = runner.invoke(app, [*args, "-o", str(tmp_path / "plain.onnx")])
    assert spilled.exit_code == 0 and plain.exit_code == 0, spilled.output + plain.output
    assert (tmp_path / "small.onnx.data").read_bytes() == (tmp_path / "plain.onnx.data").read_bytes()
    check = runner.invoke(app, ["check", str(tmp_path / "small.onnx"), "--nm", "2:4", "--json"])
    assert check.exit_code == 0, check.output


def test_a_missing_cuda_provider_is_one_line_and_writes_nothing(tmp_path: Path, external_model: Path) -> None:
    if _cuda_available():
        pytest.skip("this onnxruntime has CUDA")
    calib = tmp_path / "calib.npz"
    np.savez(calib, input_ids=feeds()[0]["input_ids"])
    out = tmp_path / "out.onnx"
    args = ["apply", str(external_model), "--calib", str(calib), "--sequential", "--provider", "cuda"]
    result = CliRunner().invoke(app, [*args, "-o", str(out)])
    text = result.output.replace("\n", "")
    assert result.exit_code == 2 and "CUDAExecutionProvider" in text and "onnxruntime-gpu" in text
    assert len(result.output.strip().splitlines()) <= 3 and "Traceback" not in result.output  # one (wrapped) line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "in"]


def _cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(), reason="needs onnxruntime-gpu and a CUDA GPU")
def test_segments_on_cuda_give_the_cpu_statistics(tmp_path: Path, external_model: Path) -> None:
    data = feeds()
    plan = PrunePass(config=WANDA).plan(load_model(external_model))
    cpu_request = request(data)
    gpu_request = replace(cpu_request, provider="cuda")
    collected = {}
    for name, req in (("cpu", cpu_request), ("cuda", gpu_request)):
        fresh = load_model(external_model)
        prune_in_segments(fresh, external_model.parent, tmp_path / f"{name}.onnx", WANDA, req, "block", plan)
        collected[name] = weights_of(tmp_path / f"{name}.onnx")
    for name, weight in collected["cpu"].items():  # float sums differ in the last bits; masks must not
        np.testing.assert_array_equal(collected["cuda"][name] != 0, weight != 0)
