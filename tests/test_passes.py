"""PrunePass and CheckPass as onnx-ir passes: in place, pre/post-conditions, composition, numeric equivalence.

In the style of onnxscript's rewriter tests: models written as ONNX text, run by ONNX Runtime before and after
on seeded random inputs, compared with numpy applying the independently masked weights.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest

import graphprune.passes.prune as prune_module
from graphprune.algorithms.pattern import NMPattern, Scope, Unstructured
from graphprune.algorithms.scores import Method
from graphprune.errors import GraphpruneError
from graphprune.passes.check import CheckPass
from graphprune.passes.prune import PruneConfig, PrunePass
from tests.onnx_builders import init, reference_nm_mask, run

PATTERN = NMPattern(2, 4)
CONFIG = PruneConfig(PATTERN, include_head=True)

MLP = """
<ir_version: 8, opset_import: ["" : 17]>
mlp (float[4,16] x) => (float[4,8] y) {
  h = Gemm <transB = 1> (x, w1, b1)
  r = Relu(h)
  y = MatMul(r, w2)
}
"""


def mlp() -> tuple[ir.Model, dict[str, np.ndarray]]:
    rng = np.random.default_rng(202400)  # this function's own data, whatever ran before
    weights = {
        "w1": rng.standard_normal((32, 16)).astype(np.float32),  # Gemm transB: [N, K]
        "b1": rng.standard_normal(32).astype(np.float32),
        "w2": rng.standard_normal((32, 8)).astype(np.float32),  # MatMul B: [K, N]
    }
    proto = onnx.parser.parse_model(MLP)
    proto.graph.initializer.extend(init(v, k) for k, v in weights.items())
    return ir.from_proto(proto), weights


def test_prune_pass_is_in_place_and_numerically_what_numpy_computes() -> None:
    rng = np.random.default_rng(202401)  # this function's own data, whatever ran before
    model, w = mlp()
    x = rng.standard_normal((4, 16)).astype(np.float32)
    (dense,) = run(model, {"x": x})
    result = PrunePass(config=CONFIG)(model)
    assert result.model is model and result.modified
    assert sorted(r.name for r in result.pruned) == ["w1", "w2"]
    w1 = np.where(reference_nm_mask(w["w1"], 1, 2, 4), w["w1"], 0)
    w2 = np.where(reference_nm_mask(w["w2"], 0, 2, 4), w["w2"], 0)
    (pruned,) = run(model, {"x": x})
    np.testing.assert_allclose(pruned, np.maximum(x @ w1.T + w["b1"], 0) @ w2, rtol=1e-5, atol=1e-5)
    assert not np.allclose(pruned, dense)


def test_passes_compose_with_onnx_ir_sequential() -> None:
    model, _ = mlp()
    result = ir.passes.Sequential(PrunePass(config=CONFIG), CheckPass(PATTERN, include_head=True))(model)
    assert result.modified and result.model is model
    assert CheckPass(PATTERN, include_head=True)(model).ok


def test_functionalized_prune_leaves_its_input_alone() -> None:
    model, w = mlp()
    result = ir.passes.functionalize(PrunePass(config=CONFIG))(model)
    assert result.model is not model and result.modified
    np.testing.assert_array_equal(model.graph.initializers["w2"].const_value.numpy(), w["w2"])
    assert not CheckPass(PATTERN, include_head=True)(model).ok
    assert CheckPass(PATTERN, include_head=True)(result.model).ok


def test_check_pass_changes_nothing_and_finds_dense_weights() -> None:
    model, w = mlp()
    result = CheckPass(PATTERN, include_head=True)(model)
    assert result.model is model and not result.modified and not result.ok
    assert {v.name for v in result.violations} == {"w1", "w2"}
    np.testing.assert_array_equal(model.graph.initializers["w1"].const_value.numpy(), w["w1"])


def test_precondition_calibrated_method_without_statistics() -> None:
    model, w = mlp()
    with pytest.raises(ir.passes.PreconditionError, match="needs activation statistics") as caught:
        PrunePass(config=PruneConfig(PATTERN, method=Method.WANDA, include_head=True))(model)
    assert isinstance(caught.value, GraphpruneError)  # the CLI prints it as one line
    np.testing.assert_array_equal(model.graph.initializers["w1"].const_value.numpy(), w["w1"])


def test_postcondition_catches_a_mask_that_breaks_n_m(monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = mlp()
    monkeypatch.setattr(prune_module, "nm_mask", lambda scores, pattern, axis=-1: np.ones(scores.shape, bool))
    monkeypatch.setattr(prune_module, "mask_from_scores", lambda scores, pattern: np.ones(scores.shape, bool))
    with pytest.raises(ir.passes.PostconditionError, match="breaks 2:4 along K"):
        PrunePass(config=CONFIG)(model)


def test_nothing_to_prune_is_not_a_modification() -> None:
    proto = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,8] x, float[8,4] w) => (float[2,4] y) { y = MatMul(x, w) }
        """
    )
    result = PrunePass(config=CONFIG)(ir.from_proto(proto))
    assert not result.modified and result.pruned == [] and "graph input" in (result.skipped[0].skipped or "")


def test_unstructured_pattern_has_no_n_m_postcondition() -> None:
    model, _ = mlp()
    result = PrunePass(config=PruneConfig(Unstructured(0.75, Scope.LAYER), include_head=True))(model)
    assert result.modified and result.achieved_sparsity() == pytest.approx(0.75)
