"""The coupling walker and its op-rule table: one rule serves shrink's units, heads and permutation groups alike,
checked by ONNX Runtime on the model before and after slicing or reordering the channels the walk found."""

from __future__ import annotations

import numpy as np
import onnx.parser
import onnx_ir as ir
import pytest

from graphprune.graph.channel_groups import PERIODIC
from graphprune.graph.coupling import FLOWS
from graphprune.graph.groups import CHANNELS, find_groups
from graphprune.graph.heads import HEADS
from graphprune.passes.permute import find_channel_groups, write_permutation
from tests.onnx_builders import init, run

# fc2(max(fc1 x + b1, 0) ⊙ min(fc3 x, 1)): Max and Min were in the heads walker's table only.
MAX_MLP = """
<ir_version: 8, opset_import: ["" : 17]>
mlp (float[2,3,8] x) => (float[2,3,8] y) {
  f = MatMul(x, fc1)
  a = Add(f, b1)
  r = Max(a, zero)
  g = MatMul(x, fc3)
  c = Min(g, one)
  h = Mul(r, c)
  y = MatMul(h, fc2)
}
"""


def _model(text: str, rng: np.random.Generator, **replace: str) -> ir.Model:
    for old, new in replace.items():
        text = text.replace(old, new)
    weights = {
        "fc1": rng.standard_normal((8, 16)),
        "fc3": rng.standard_normal((8, 16)),
        "b1": rng.standard_normal(16),
        "fc2": rng.standard_normal((16, 8)),
        "zero": np.zeros(()),
        "one": np.ones(()),
        "ln_w": np.ones(16),
        "ln_b": np.zeros(16),
    }
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend(init(v.astype(np.float32), k) for k, v in weights.items())
    return ir.from_proto(proto)


def test_a_shared_rule_gives_a_unit_whose_removal_is_exact() -> None:
    """Slicing channels S out of every slot of the group equals zeroing the reader's K rows S in the original."""
    rng = np.random.default_rng(1)
    model = _model(MAX_MLP, rng)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    scan = find_groups(model, ("mlp",))
    assert len(scan.groups) == 1, scan.skips
    (group,) = scan.groups
    assert sorted((str(s.value.name), s.axis, s.role) for s in group.slots) == [
        ("b1", 0, "channelwise"),
        ("fc1", 1, "producer"),
        ("fc2", 0, "consumer"),
        ("fc3", 1, "producer"),
    ]
    removed = np.array([2, 5, 11])
    reference = _model(MAX_MLP, np.random.default_rng(1))
    fc2 = reference.graph.initializers["fc2"]
    zeroed = fc2.const_value.numpy().copy()  # type: ignore[union-attr]
    zeroed[removed] = 0
    fc2.const_value = ir.tensor(zeroed, name="fc2")
    for slot in group.slots:
        kept = np.delete(slot.value.const_value.numpy(), removed, axis=slot.axis)  # type: ignore[union-attr]
        slot.value.const_value = ir.tensor(kept, name=slot.value.name)
        slot.value.shape = ir.Shape(kept.shape)
    (expected,) = run(reference, {"x": x})
    (sliced,) = run(model, {"x": x})
    np.testing.assert_allclose(sliced, expected, rtol=1e-5, atol=1e-5)


def test_the_same_rule_gives_a_permutation_that_keeps_the_outputs() -> None:
    rng = np.random.default_rng(2)
    model = _model(MAX_MLP, rng)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    (before,) = run(model, {"x": x})
    fc2 = model.graph.initializers["fc2"].const_value.numpy().copy()  # type: ignore[union-attr]
    groups, weights = find_channel_groups(model)
    assert {g.reader: (g.writers, g.biases, g.period) for g in groups.values()} == {
        "fc2": (("fc1", "fc3"), ("b1",), 16)
    }
    write_permutation(model, groups["fc2"], rng.permutation(16), weights)
    (after,) = run(model, {"x": x})
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(model.graph.initializers["fc2"].const_value.numpy(), fc2)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"r = Max(a, zero)": "r = LayerNormalization(a, ln_w, ln_b)"}, "LayerNormalization"),
        ({"c = Min(g, one)": "c = Pow(one, g)"}, "feed a parameter of Pow"),  # the channels as an exponent
    ],
    ids=["norm", "exponent"],
)
def test_what_the_table_cannot_prove_is_skipped_with_the_op_named(change: dict[str, str], reason: str) -> None:
    model = _model(MAX_MLP, np.random.default_rng(3), **change)
    scan = find_groups(model, ("mlp",))
    assert not scan.groups
    assert any(reason in s.reason for s in scan.skips), scan.skips
    assert find_channel_groups(model)[0] == {}


def test_every_flow_a_client_follows_has_a_step() -> None:
    for policy in (CHANNELS, HEADS, PERIODIC):
        assert policy.flows <= set(FLOWS), policy.what
