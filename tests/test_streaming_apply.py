"""Issue 14 (1): a model with external data is pruned while it is written, one weight at a time, and the
files are byte for byte those of pruning everything in memory first."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import graphprune.passes.prune as prune_module
from graphprune.algorithms.pattern import NMPattern, Scope, Unstructured
from graphprune.errors import GraphpruneError
from graphprune.graph.model_io import load_model, save_model
from graphprune.passes.prune import PruneConfig, PrunePass
from graphprune.pipeline.files import prune_file
from tests.onnx_builders import layered_model

CONFIGS = [PruneConfig(NMPattern(2, 4)), PruneConfig(Unstructured(0.5, Scope.OUTPUT), include_head=True)]


def external_model(tmp_path: Path) -> Path:
    path = tmp_path / "in" / "model.onnx"
    path.parent.mkdir()
    onnx.save_model(layered_model(), str(path), save_as_external_data=True, location="w.bin", size_threshold=0)
    return path


@pytest.mark.parametrize("config", CONFIGS, ids=["2:4", "50%-output"])
def test_streamed_output_is_byte_identical_to_the_in_memory_one(tmp_path: Path, config: PruneConfig) -> None:
    source = external_model(tmp_path)
    _, result = prune_file(source, config, tmp_path / "streamed" / "pruned.onnx")
    model = load_model(source)
    in_memory = PrunePass(config=config)(model)  # every pruned weight held in memory, then written
    save_model(model, tmp_path / "memory" / "pruned.onnx", external_data=True)
    for name in ("pruned.onnx", "pruned.onnx.data"):
        assert (tmp_path / "streamed" / name).read_bytes() == (tmp_path / "memory" / name).read_bytes()
    assert result.to_dict()["weights"] == in_memory.to_dict()["weights"]  # sparsities filled while writing


def test_deferred_pass_reads_nothing_until_the_model_is_written(tmp_path: Path) -> None:
    model = load_model(external_model(tmp_path))
    result = PrunePass(config=CONFIGS[0], defer=True)(model)
    assert isinstance(model.graph.initializers["w1"].const_value, ir.LazyTensor)
    assert all(w.sparsity is None for w in result.pruned)
    save_model(model, tmp_path / "out.onnx", external_data=True)
    assert [w.sparsity for w in result.pruned] == [0.5, 0.5]


def test_a_broken_mask_fails_while_writing_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = external_model(tmp_path)
    monkeypatch.setattr(prune_module, "nm_mask", lambda scores, pattern, axis=-1: np.ones(scores.shape, bool))
    with pytest.raises(GraphpruneError, match="breaks 2:4"):
        prune_file(source, CONFIGS[0], tmp_path / "out" / "pruned.onnx")
    assert not (tmp_path / "out").exists()  # nothing: the writer also removes the folder it created for it


def test_wanda_scores_each_chunk_of_a_large_weight_with_its_own_statistics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A weight above the chunk size is masked a few rows of K at a time (K is a MatMul weight's first stored
    axis); each chunk's |W|·‖X‖ takes its own part of Σx² (the 27 GB model's weights failed here)."""
    from onnx import helper

    from graphprune.algorithms.scores import Method
    from tests.onnx_builders import init, initializer, make_ir_model, reference_nm_mask, tensor

    monkeypatch.setattr(prune_module, "_CHUNK_ELEMENTS", 64)  # a 32x16 weight: chunks of 4 rows of K
    rng = np.random.default_rng(4096)
    weight = rng.standard_normal((32, 16)).astype(np.float32)
    sumsq = rng.uniform(0.01, 100.0, 32)  # scales far apart: the mask differs from magnitude's
    model = make_ir_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], [tensor("x", shape=["n", 32])], [tensor("y")],
        [init(weight, "w")],
    )  # fmt: skip
    PrunePass(config=PruneConfig(NMPattern(2, 4), method=Method.WANDA, include_head=True), stats={"w": sumsq})(
        model
    )
    scores = np.abs(weight) * np.sqrt(sumsq)[:, None].astype(np.float32)
    expected = weight * reference_nm_mask(scores, 0, 2, 4)
    np.testing.assert_array_equal(initializer(model, "w"), expected)
    assert (reference_nm_mask(weight, 0, 2, 4) != (expected != 0)).any()  # not what magnitude would keep
