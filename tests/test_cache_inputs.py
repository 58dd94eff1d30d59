"""Decoder exports with a key/value cache: calibration feeds empty caches and positions by itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphprune.algorithms.pattern import NMPattern
from graphprune.algorithms.scores import Method
from graphprune.calibration import CalibrationRequest, calibrate
from graphprune.calibration.cache_inputs import complete_feed
from graphprune.calibration.signature import model_inputs
from graphprune.errors import GraphpruneError
from graphprune.graph.targets import find_targets
from graphprune.passes.prune import PruneConfig
from graphprune.pipeline.sequential import prune_sequentially
from tests.onnx_builders import init, initializer, make_model, run, tensor

VOCAB, HIDDEN, HEADS, HEAD_DIM, LAYERS = 40, 8, 2, 4, 2
INT64 = TensorProto.INT64


def decoder() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A tiny decoder with a real cache: per layer, K/V of the new tokens are appended to ``past_key_values.N.*``
    along the past axis and returned as ``present.N.*``; attention reads the whole (past + new) cache."""
    rng = np.random.default_rng(3)
    w = {"embed": rng.standard_normal((VOCAB, HIDDEN)), "positions": rng.standard_normal((64, HIDDEN))}
    for i in range(LAYERS):
        for p in "qkvo":
            w[f"l{i}.{p}"] = rng.standard_normal((HIDDEN, HIDDEN))
    w["lm_head"] = rng.standard_normal((HIDDEN, VOCAB))
    w = {k: v.astype(np.float32) for k, v in w.items()}
    consts = {
        "heads_shape": np.array([0, 0, HEADS, HEAD_DIM], np.int64),
        "hidden_shape": np.array([0, 0, HIDDEN], np.int64),
    }
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["tok"]),
        helper.make_node("Gather", ["positions", "position_ids"], ["pos"]),
        helper.make_node("Add", ["tok", "pos"], ["h0"]),
    ]
    inputs = [
        tensor("input_ids", INT64, ["batch", "seq"]),
        tensor("attention_mask", INT64, ["batch", "total"]),
        tensor("position_ids", INT64, ["batch", "seq"]),
    ]
    outputs = [tensor("logits", shape=["batch", "seq", VOCAB])]
    h = "h0"
    for i in range(LAYERS):
        for p in "qkv":
            nodes += [
                helper.make_node("MatMul", [h, f"l{i}.{p}"], [f"l{i}.{p}_out"]),
                helper.make_node("Reshape", [f"l{i}.{p}_out", "heads_shape"], [f"l{i}.{p}_heads"]),
                helper.make_node("Transpose", [f"l{i}.{p}_heads"], [f"l{i}.{p}_t"], perm=[0, 2, 1, 3]),
            ]
        for kv in ("key", "value"):
            inputs.append(tensor(f"past_key_values.{i}.{kv}", shape=["batch", HEADS, "past", HEAD_DIM]))
            outputs.append(tensor(f"present.{i}.{kv}", shape=["batch", HEADS, "total", HEAD_DIM]))
            nodes.append(
                helper.make_node(
                    "Concat",
                    [f"past_key_values.{i}.{kv}", f"l{i}.{kv[0]}_t"],
                    [f"present.{i}.{kv}"],
                    axis=2,
                )
            )
        nodes += [
            helper.make_node("Transpose", [f"present.{i}.key"], [f"l{i}.kT"], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", [f"l{i}.q_t", f"l{i}.kT"], [f"l{i}.scores"]),
            helper.make_node("Softmax", [f"l{i}.scores"], [f"l{i}.probs"], axis=-1),
            helper.make_node("MatMul", [f"l{i}.probs", f"present.{i}.value"], [f"l{i}.ctx"]),
            helper.make_node("Transpose", [f"l{i}.ctx"], [f"l{i}.ctx_t"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", [f"l{i}.ctx_t", "hidden_shape"], [f"l{i}.ctx_h"]),
            helper.make_node("MatMul", [f"l{i}.ctx_h", f"l{i}.o"], [f"l{i}.attn"]),
            helper.make_node("Add", [h, f"l{i}.attn"], [f"h{i + 1}"]),
        ]
        h = f"h{i + 1}"
    nodes.append(helper.make_node("MatMul", [h, "lm_head"], ["logits"]))
    inits = [init(a, n) for n, a in {**w, **consts}.items()]
    return make_model(nodes, inputs, outputs, inits, opset=18), w


def full_feed(ids: np.ndarray) -> dict[str, np.ndarray]:
    """What a user would otherwise have to build: every cache empty, positions 0..n-1."""
    b, s = ids.shape
    feed = {"input_ids": ids, "attention_mask": np.ones((b, s), np.int64)}
    feed["position_ids"] = np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy()
    for i in range(LAYERS):
        for kv in ("key", "value"):
            feed[f"past_key_values.{i}.{kv}"] = np.zeros((b, HEADS, 0, HEAD_DIM), np.float32)
    return feed


def hidden_states(model: onnx.ModelProto, feed: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
    """Tensors of the model fetched by an independent ONNX Runtime run on the explicit feed."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    return run(probe, feed)


def test_the_cache_is_a_real_one() -> None:
    """Sanity of the test model: with a non-empty past the logits change, with an empty one they do not."""
    model, _ = decoder()
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 5))
    empty = run(model, full_feed(ids))
    assert empty[1].shape == (2, HEADS, 5, HEAD_DIM)  # present = past (0) + new (5)
    past = full_feed(ids)
    past["past_key_values.0.key"] = np.ones((2, HEADS, 3, HEAD_DIM), np.float32)
    past["past_key_values.0.value"] = np.ones((2, HEADS, 3, HEAD_DIM), np.float32)
    past["attention_mask"] = np.ones((2, 8), np.int64)
    assert not np.allclose(run(model, past)[0], empty[0])


def test_complete_feed_adds_empty_caches_and_positions_only_where_missing() -> None:
    model, _ = decoder()
    ids = np.arange(10, dtype=np.int64).reshape(2, 5)
    feed = complete_feed({"input_ids": ids, "attention_mask": np.ones((2, 5), np.int64)}, model_inputs(model))
    expected = full_feed(ids)
    assert sorted(feed) == sorted(expected)
    for name, array in expected.items():
        assert feed[name].dtype == array.dtype and feed[name].shape == array.shape
        np.testing.assert_array_equal(feed[name], array)
    given = np.full((2, 5), 7, np.int64)
    assert complete_feed({"input_ids": ids, "position_ids": given}, model_inputs(model))["position_ids"] is given


def test_calibration_of_a_decoder_with_a_cache_from_token_ids_alone() -> None:
    model, _ = decoder()
    ids = np.random.default_rng(1).integers(0, VOCAB, (6, 7))
    data = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    targets = find_targets(ir.from_proto(model)).targets
    # every Q/K/V/O weight is a target; K/V reach an output only through present.*, yet they are no heads
    assert {t.name for t in targets} >= {f"l{i}.{p}" for i in range(LAYERS) for p in "qkvo"}
    stats = calibrate(model, CalibrationRequest(data, batch_size=4), targets)
    for t in targets:
        (consumer,) = t.consumers
        chunks = [hidden_states(model, full_feed(ids[s : s + 4]), [consumer.activation])[0] for s in (0, 4)]
        rows = np.concatenate([c.reshape(-1, t.k) for c in chunks]).astype(np.float64)
        np.testing.assert_allclose(stats.sumsq[t.name], (rows**2).sum(axis=0), rtol=1e-5)
        assert stats.rows[t.name] == rows.shape[0]


def test_text_calibration_of_a_decoder_with_a_cache(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(VOCAB - 1)]
    tok = Tokenizer(
        models.WordLevel({w: i for i, w in enumerate(words)} | {"[UNK]": VOCAB - 1}, unk_token="[UNK]")
    )
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "corpus.txt").write_text(" ".join(np.random.default_rng(2).choice(words, 300)))
    model, _ = decoder()
    request = CalibrationRequest(
        str(tmp_path / "corpus.txt"),
        tokenizer=str(tmp_path / "tokenizer.json"),
        seqlen=12,
        nsamples=5,
        batch_size=2,
    )
    stats = calibrate(model, request)
    assert stats.rows["l0.q"] == 5 * 12 and stats.rows["lm_head"] == 5 * 12
    assert all(np.all(stats.sumsq[n] > 0) for n in stats.sumsq)


@pytest.mark.parametrize("sequential", ["block", "level"])
def test_sequential_calibration_of_a_decoder_with_a_cache(sequential: str) -> None:
    model, dense = decoder()
    ids = np.random.default_rng(4).integers(0, VOCAB, (4, 6))
    batches, _ = CalibrationRequest({"input_ids": ids, "attention_mask": np.ones_like(ids)}, batch_size=2).batches(
        model
    )
    assert set(batches[0]) == set(full_feed(ids))
    h0 = hidden_states(model, full_feed(ids), ["h0"])[0]
    model = ir.from_proto(model)
    result, _ = prune_sequentially(
        model, PruneConfig(NMPattern(2, 4), method=Method.WANDA), batches, sequential=sequential
    )
    # every Q/K/V/O weight is pruned, only the LM head stays dense
    assert {w.name for w in result.pruned} == {f"l{i}.{p}" for i in range(LAYERS) for p in "qkvo"}
    assert [w.name for w in result.skipped] == ["lm_head"]
    # the first group (Q/K/V of layer 0) reads h0, which no weight precedes: Wanda on numpy's statistics
    norms = np.sqrt((h0.astype(np.float64) ** 2).reshape(-1, HIDDEN).sum(axis=0))
    for p in "qkv":
        w = dense[f"l0.{p}"]
        groups = (np.abs(w) * norms[:, None]).T.reshape(HIDDEN, -1, 4)
        keep = np.zeros(groups.shape, bool)
        np.put_along_axis(keep, np.argsort(-groups, axis=-1)[..., :2], True, axis=-1)
        np.testing.assert_array_equal(initializer(model, f"l0.{p}"), np.where(keep.reshape(HIDDEN, -1).T, w, 0))


def test_a_missing_token_input_names_a_few_inputs_and_counts_the_rest() -> None:
    model, _ = decoder()
    with pytest.raises(GraphpruneError) as err:
        calibrate(model, CalibrationRequest({"attention_mask": np.ones((2, 5), np.int64)}))
    message = str(err.value)
    assert "\n" not in message and "more" in message and message.count("past_key_values") <= 3
