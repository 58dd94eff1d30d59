"""Issue 12 (4): a main-graph weight also read inside an If/Loop body is pruned only where every use agrees."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir

from graphprune.algorithms.masks import nm_violations
from graphprune.algorithms.pattern import NMPattern
from graphprune.algorithms.scores import Method
from graphprune.passes.prune import PruneConfig, PrunePass
from graphprune.pipeline.files import prune_file
from tests.onnx_builders import init, run

CONFIG = PruneConfig(NMPattern(2, 4), include_head=True)


def with_weight(text: str, w: np.ndarray) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    model.graph.initializer.append(init(w, "w"))
    return model


# The If's then-branch reads ``w`` element-wise: pruning ``w`` for the MatMul would change ``z``.
ELEMENTWISE_IN_BODY = """
<ir_version: 8, opset_import: ["" : 17]>
agraph (float[2,8] x, bool c) => (float[2,4] y, float[8,4] z) {
  y = MatMul(x, w)
  z = If(c) <then_branch = t () => (float[8,4] o) { o = Mul(w, w) },
             else_branch = e () => (float[8,4] o2) { o2 = Neg(w) }>
}
"""

# Both branches multiply by ``w`` along the same K as the main graph: one target, pruned for all.
MATMUL_IN_BODY = """
<ir_version: 8, opset_import: ["" : 17]>
agraph (float[2,8] x, bool c) => (float[2,4] y, float[2,4] z) {
  y = MatMul(x, w)
  z = If(c) <then_branch = t () => (float[2,4] o) { o = MatMul(x, w) },
             else_branch = e () => (float[2,4] o2) { r = Relu(x)
                                                    o2 = MatMul(r, w) }>
}
"""


def test_a_weight_read_element_wise_by_a_body_is_left_alone(tmp_path: Path) -> None:
    rng = np.random.default_rng(2100)  # this function's own data, whatever ran before
    w = rng.standard_normal((8, 4)).astype(np.float32)
    model = with_weight(ELEMENTWISE_IN_BODY, w)
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path))
    feeds = {"x": rng.standard_normal((2, 8)).astype(np.float32)}
    for c in (True, False):
        feeds["c"] = np.array(c)
        before = run(model, feeds)
        out = tmp_path / f"out-{c}.onnx"
        try:
            prune_file(path, CONFIG, out)
        except Exception as exc:  # nothing to prune is the right answer too
            assert "nothing to prune" in str(exc)
            continue
        after = run(onnx.load_model(str(out)), feeds)
        np.testing.assert_array_equal(after[1], before[1])  # the body's result is unchanged


def test_the_skip_names_the_subgraph() -> None:
    rng = np.random.default_rng(2101)  # this function's own data, whatever ran before
    model = ir.from_proto(with_weight(ELEMENTWISE_IN_BODY, rng.standard_normal((8, 4)).astype(np.float32)))
    result = PrunePass(config=CONFIG)(model)
    (skip,) = result.skipped
    assert skip.name == "w" and "subgraph" in (skip.skipped or "")
    assert not result.modified


def test_consumers_inside_bodies_that_agree_on_k_are_pruned_with_the_main_graph() -> None:
    rng = np.random.default_rng(2102)  # this function's own data, whatever ran before
    w = rng.standard_normal((8, 4)).astype(np.float32)
    model = ir.from_proto(with_weight(MATMUL_IN_BODY, w))
    result = PrunePass(config=CONFIG)(model)
    assert [r.name for r in result.pruned] == ["w"]
    pruned = model.graph.initializers["w"].const_value.numpy()
    assert nm_violations(pruned.T, NMPattern(2, 4)).size == 0
    x = rng.standard_normal((2, 8)).astype(np.float32)
    for c, body in ((True, x @ pruned), (False, np.maximum(x, 0) @ pruned)):
        y, z = run(model, {"x": x, "c": np.array(c)})
        np.testing.assert_allclose(y, x @ pruned, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(z, body, rtol=1e-5, atol=1e-6)


def test_calibrated_methods_skip_weights_read_inside_bodies() -> None:
    rng = np.random.default_rng(2103)  # this function's own data, whatever ran before
    model = ir.from_proto(with_weight(MATMUL_IN_BODY, rng.standard_normal((8, 4)).astype(np.float32)))
    result = PrunePass(
        config=PruneConfig(NMPattern(2, 4), method=Method.WANDA, include_head=True), stats={"w": np.ones(8)}
    )(model)
    (skip,) = result.skipped
    assert "If/Loop/Scan body" in (skip.skipped or "") and not result.modified
