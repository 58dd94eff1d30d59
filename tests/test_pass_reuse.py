"""Passes hold configuration only: one instance applied to several models, directly, in a ``PassManager`` or
composed in a ``Sequential``, does exactly what fresh instances do; graphprune's errors leave ``Sequential`` as
raised.

The model is one transformer block written as ONNX text (attention with two heads, a LLaMA MLP) with no
value_info, so that channel permutation has both kinds of group to write and must infer shapes to find them.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import onnx.parser
import onnx_ir as ir
import pytest

from graphprune.algorithms.pattern import NMPattern
from graphprune.algorithms.scores import Method
from graphprune.passes.base import PassPreconditionError, Sequential
from graphprune.passes.permute import PermutePass
from graphprune.passes.prune import PruneConfig, PrunePass
from tests.onnx_builders import init, run

PATTERN = NMPattern(2, 4)
HIDDEN, FFN = 16, 32

BLOCK = """
<ir_version: 8, opset_import: ["" : 17]>
block (float[2,5,16] x) => (float[2,5,16] y) {
  q = MatMul(x, wq)
  k = MatMul(x, wk)
  v = MatMul(x, wv)
  q4 = Reshape(q, heads)
  k4 = Reshape(k, heads)
  v4 = Reshape(v, heads)
  qh = Transpose <perm = [0, 2, 1, 3]> (q4)
  kh = Transpose <perm = [0, 2, 3, 1]> (k4)
  vh = Transpose <perm = [0, 2, 1, 3]> (v4)
  s = MatMul(qh, kh)
  p = Softmax <axis = -1> (s)
  c = MatMul(p, vh)
  ct = Transpose <perm = [0, 2, 1, 3]> (c)
  cm = Reshape(ct, merged)
  a = MatMul(cm, wo)
  h = Add(x, a)
  g = MatMul(h, gate)
  sg = Sigmoid(g)
  silu = Mul(g, sg)
  u = MatMul(h, up)
  m = Mul(silu, u)
  d = MatMul(m, down)
  y = Add(h, d)
}
"""
SHAPES = {"wq": (16, 16), "wk": (16, 16), "wv": (16, 16), "wo": (16, 16), "gate": (16, 32), "up": (16, 32)}
SHAPES["down"] = (32, 16)


def block(seed: int = 5) -> ir.Model:
    """The same block for the same seed: its weights are fixed by the seed alone."""
    rng = np.random.default_rng(seed)
    proto = onnx.parser.parse_model(BLOCK)
    proto.graph.initializer.extend(init(rng.standard_normal(s).astype(np.float32), n) for n, s in SHAPES.items())
    proto.graph.initializer.extend(
        [init(np.array([0, 0, 2, 8], np.int64), "heads"), init(np.array([0, 0, 16], np.int64), "merged")]
    )
    return ir.from_proto(proto)


def statistics(seed: int = 9) -> SimpleNamespace:
    """Σx² and XᵀX per weight from random activations, one array per distinct input (Q/K/V share one, gate/up
    another: ALPS solves them together), a few loud channels so that a permutation pays."""
    rng = np.random.default_rng(seed)
    inputs = {"x": HIDDEN, "ctx": HIDDEN, "h": HIDDEN, "m": FFN}
    readers = {"wq": "x", "wk": "x", "wv": "x", "wo": "ctx", "gate": "h", "up": "h", "down": "m"}
    sumsq, gram = {}, {}
    for name, width in inputs.items():
        x = rng.standard_normal((64, width))
        x[:, :4] *= 10.0
        sumsq[name], gram[name] = (x**2).sum(axis=0), x.T @ x
    return SimpleNamespace(
        sumsq={w: sumsq[i] for w, i in readers.items()}, gram={w: gram[i] for w, i in readers.items()}
    )


def weights(model: ir.Model) -> dict[str, bytes]:
    return {name: v.const_value.tobytes() for name, v in model.graph.initializers.items()}  # type: ignore[union-attr]


def config(method: Method, permute: bool = True) -> PruneConfig:
    return PruneConfig(PATTERN, method=method, include_head=True, permute=permute)


@pytest.mark.parametrize("method", list(Method), ids=lambda m: m.value)
def test_one_instance_prunes_a_second_model_as_a_fresh_instance_does(method: Method) -> None:
    stats = statistics()
    reused = PrunePass(config=config(method), stats=stats)
    reused(block())
    second = reused(block())
    fresh = PrunePass(config=config(method), stats=statistics())(block())
    assert weights(second.model) == weights(fresh.model)
    assert [w.permutation for w in second.weights] == [w.permutation for w in fresh.weights]
    assert sum(bool(w.permutation and w.permutation["written"]) for w in fresh.weights) == 2  # MLP and heads
    expected = statistics()  # the statistics given are read, never reordered in place
    assert all(np.array_equal(stats.sumsq[n], expected.sumsq[n]) for n in SHAPES)
    assert all(np.array_equal(stats.gram[n], expected.gram[n]) for n in SHAPES)


@pytest.mark.parametrize("method", [Method.WANDA, Method.ALPS], ids=lambda m: m.value)
def test_a_pass_manager_of_two_steps_reused_equals_a_fresh_one(method: Method) -> None:
    stats = statistics()
    manager = ir.passes.PassManager([PrunePass(config=config(method), stats=stats)], steps=2, early_stop=False)
    first, second = block(), block()
    manager(first)
    manager(second)
    fresh = block()
    ir.passes.PassManager([PrunePass(config=config(method), stats=statistics())], steps=2, early_stop=False)(fresh)
    assert weights(first) == weights(fresh) and weights(second) == weights(fresh)


def test_permute_then_prune_in_a_sequential_equals_the_permute_option() -> None:
    """Wanda's N:M mask treats each output row alone, so writing every order first (the Sequential) or each
    right before its reader is pruned (``permute=True``) leaves the same bytes."""
    stats = statistics()
    composed = block()
    Sequential(
        PermutePass(pattern=PATTERN, method=Method.WANDA, stats=stats),
        PrunePass(config=config(Method.WANDA, permute=False), stats=stats),
    )(composed)
    option = PrunePass(config=config(Method.WANDA), stats=stats)(block())
    assert weights(composed) == weights(option.model)
    unpermuted = PrunePass(config=config(Method.WANDA, permute=False), stats=stats)(block())
    assert weights(composed) != weights(unpermuted.model)


def test_the_permutation_pass_keeps_the_function_and_the_callers_shapes_unknown() -> None:
    """ONNX Runtime computes the same outputs after the permutation; the shapes the group finder needed were
    inferred on a copy: the caller's model holds no shape it did not hold."""
    model = block()
    x = np.random.default_rng(1).standard_normal((2, 5, HIDDEN)).astype(np.float32)
    (dense,) = run(model, {"x": x})
    before = weights(model)
    result = PermutePass(pattern=PATTERN, method=Method.WANDA, stats=statistics())(model)
    assert result.modified and sorted(g.reader for g in result.groups) == ["down", "wo"]
    assert sorted(result.rewritten) == ["down", "gate", "up", "wo", "wv"]
    assert weights(model) != before
    (permuted,) = run(model, {"x": x})
    np.testing.assert_allclose(permuted, dense, rtol=1e-5, atol=1e-5)
    assert all(v.shape is None for node in model.graph for v in node.outputs if not v.is_graph_output())


def test_passes_show_their_configuration() -> None:
    text = repr(PrunePass(config=PruneConfig(PATTERN, method=Method.WANDA), stats={"w": np.ones(4)}))
    assert text.startswith("PrunePass(config=PruneConfig(") and "wanda" in text and "<1 weights>" in text
    permute = repr(PermutePass(pattern=PATTERN, readers=["down"]))
    assert permute == "PermutePass(pattern=2:4, method=magnitude, stats=None, readers=['down'])"


def test_graphprune_errors_leave_a_sequential_as_raised() -> None:
    """onnx-ir's Sequential wraps an inner pass's error in a PassError named after the pass (its repr, now its
    configuration); graphprune's Sequential lets the graphprune error through with its own message."""
    needs_stats = PrunePass(config=config(Method.WANDA, permute=False))
    with pytest.raises(PassPreconditionError, match=r"^wanda needs activation statistics"):
        Sequential(PermutePass(pattern=PATTERN), needs_stats)(block())
    with pytest.raises(ir.passes.PassError, match=r"'PrunePass\(config=PruneConfig\(pattern=") as wrapped:
        ir.passes.Sequential(needs_stats)(block())
    assert isinstance(wrapped.value.__cause__, PassPreconditionError)


def test_conversion_leaves_the_process_logging_as_it_found_it() -> None:
    """ONNX Runtime's float16 converter logs every clamped value: quiet while it runs, its level restored."""
    from graphprune.passes.convert import convert

    proto = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]> m (float[2,16] x) => (float[2,16] y) { y = MatMul(x, w) }'
    )
    proto.graph.initializer.append(init(np.full((16, 16), 1e6, np.float32), "w"))  # clamped to FP16's range
    logger = logging.getLogger("onnxruntime.transformers.float16")
    before = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        result = convert(proto, "float16")
        assert logger.level == logging.DEBUG
    finally:
        logger.setLevel(before)
    assert result.rounding.saturated == 256
