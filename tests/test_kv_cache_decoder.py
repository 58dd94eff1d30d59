"""Issue 12 (9b): in a decoder with a key/value cache, K/V projections that reach an output only through
``present.*`` are no heads; only the LM head stays dense."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from graphprune.algorithms.pattern import NMPattern
from graphprune.graph.targets import find_targets
from graphprune.passes.prune import PruneConfig
from graphprune.pipeline.files import check_file, prune_file
from tests.onnx_builders import init, make_model, run, tensor

VOCAB, D, MLP = 32, 16, 32
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def decoder_with_cache() -> onnx.ModelProto:
    """One attention block (single head) with past/present K and V, an MLP and a tied-free LM head."""

    rng = np.random.default_rng(900)  # this function's own data, whatever ran before

    def w(name: str, k: int, n: int) -> onnx.TensorProto:
        return init((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), name)

    inits = [
        init(rng.standard_normal((VOCAB, D)).astype(np.float32), "embed"),
        *(w(p, D, D) for p in PROJECTIONS[:4]),
        w("up_proj", D, MLP),
        w("down_proj", MLP, D),
        w("lm_head", D, VOCAB),
        init(np.array(1 / np.sqrt(D), np.float32), "scale"),
    ]
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["h"]),
        helper.make_node("MatMul", ["h", "q_proj"], ["q"]),
        helper.make_node("MatMul", ["h", "k_proj"], ["k"]),
        helper.make_node("MatMul", ["h", "v_proj"], ["v"]),
        helper.make_node("Concat", ["past_key_values.0.key", "k"], ["present.0.key"], axis=1),
        helper.make_node("Concat", ["past_key_values.0.value", "v"], ["present.0.value"], axis=1),
        helper.make_node("Transpose", ["present.0.key"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "present.0.value"], ["context"]),
        helper.make_node("MatMul", ["context", "o_proj"], ["attn"]),
        helper.make_node("Add", ["h", "attn"], ["h1"]),
        helper.make_node("MatMul", ["h1", "up_proj"], ["up"]),
        helper.make_node("Relu", ["up"], ["act"]),
        helper.make_node("MatMul", ["act", "down_proj"], ["down"]),
        helper.make_node("Add", ["h1", "down"], ["h2"]),
        helper.make_node("MatMul", ["h2", "lm_head"], ["logits"]),
    ]
    return make_model(
        nodes,
        [
            tensor("input_ids", TensorProto.INT64, ["batch", "seq"]),
            tensor("past_key_values.0.key", shape=["batch", "past", D]),
            tensor("past_key_values.0.value", shape=["batch", "past", D]),
        ],
        [tensor("logits"), tensor("present.0.key"), tensor("present.0.value")],
        inits,
    )


def test_only_the_lm_head_is_a_head() -> None:
    scan = find_targets(ir.from_proto(decoder_with_cache()), include_head=False)
    assert sorted(t.name for t in scan.targets) == sorted(PROJECTIONS)
    assert [s.name for s in scan.skips if "head" in s.reason] == ["lm_head"]


def test_apply_prunes_every_projection_and_the_model_still_runs(tmp_path: Path) -> None:
    rng = np.random.default_rng(901)  # this function's own data, whatever ran before
    model = decoder_with_cache()
    path = tmp_path / "decoder.onnx"
    onnx.save_model(model, str(path))
    out, result = prune_file(path, PruneConfig(NMPattern(2, 4)), tmp_path / "pruned.onnx")
    assert sorted(w.name for w in result.pruned) == sorted(PROJECTIONS)
    assert [w.name for w in result.skipped] == ["lm_head"]
    assert sorted(w.name for w in check_file(out, NMPattern(2, 4)).weights) == sorted(PROJECTIONS)
    ids = rng.integers(0, VOCAB, (1, 5))
    empty = np.zeros((1, 0, D), np.float32)  # past length 0: the first step of generation
    feeds = {"input_ids": ids, "past_key_values.0.key": empty, "past_key_values.0.value": empty}
    logits, key, _ = run(onnx.load_model(str(out)), feeds)
    assert logits.shape == (1, 5, VOCAB) and key.shape == (1, 5, D)
    before_logits = run(model, feeds)[0]
    assert not np.allclose(logits, before_logits)  # pruned weights were written
