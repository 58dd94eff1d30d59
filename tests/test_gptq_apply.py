"""The joint prune-and-quantize mode through the pruning pass and `apply --quantize`, checked in ONNX Runtime."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import helper
from typer.testing import CliRunner

from graphprune.algorithms.alps import alps
from graphprune.algorithms.gptq import gptq_quantize, sparsegpt_quantize
from graphprune.algorithms.masks import nm_violations
from graphprune.algorithms.pattern import NMPattern
from graphprune.algorithms.quant_grid import QuantGrid, dequantize_codes
from graphprune.algorithms.scores import Method
from graphprune.cli import app
from graphprune.errors import GraphpruneError
from graphprune.passes.prune import PruneConfig, PrunePass
from tests.onnx_builders import init, initializer, linear_model, run, tensor
from tests.onnx_builders import make_ir_model as make_model
from tests.references import correlated_inputs

PATTERN = NMPattern(2, 4)


def _stats(x: np.ndarray) -> SimpleNamespace:
    gram = x.astype(np.float64).T @ x.astype(np.float64)
    return SimpleNamespace(sumsq={"w": np.diag(gram).copy()}, gram={"w": gram})


def matmul_model(w_kn: np.ndarray):  # type: ignore[no-untyped-def]
    """Y = X @ W with W stored [K, N]: the solvers' canonical (N, K) layout is its transpose."""
    return make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [tensor("x", shape=[None, w_kn.shape[0]])],
        [tensor("y")],
        [init(w_kn, "w")],
    )


def test_sparsegpt_joint_mode_writes_the_solvers_values() -> None:
    rng = np.random.default_rng(5200)  # this function's own data, whatever ran before
    w = rng.standard_normal((32, 128)).astype(np.float32)  # canonical (N, K)
    x = correlated_inputs(rng, 128, rows=512).astype(np.float32)
    stats = _stats(x)
    grid = QuantGrid(precision="int4", block_size=32)
    model = matmul_model(np.ascontiguousarray(w.T))
    config = PruneConfig(PATTERN, method=Method.SPARSEGPT, include_head=True, blocksize=16, quantize=grid)
    result = PrunePass(config=config, stats=stats).call(model)
    written = initializer(model, "w")
    codes, scales, keep = sparsegpt_quantize(w, stats.gram["w"], PATTERN, grid, blocksize=16)
    expected = dequantize_codes(codes, scales, grid)
    np.testing.assert_array_equal(written, expected.T)
    assert nm_violations(expected, PATTERN).size == 0 and np.all(expected[~keep] == 0)
    assert result.to_dict()["quantize"] == {"precision": "int4", "block_size": 32}
    # ONNX Runtime computes with the grid values in the stored [K, N] layout.
    np.testing.assert_allclose(run(model, {"x": x})[0], x @ expected.T, rtol=1e-4, atol=1e-3)


def test_alps_joint_mode_is_gptq_under_the_alps_mask() -> None:
    rng = np.random.default_rng(5201)  # this function's own data, whatever ran before
    w = rng.standard_normal((12, 16)).astype(np.float32)
    x = correlated_inputs(rng, 16, rows=128).astype(np.float32)
    stats = _stats(x)
    grid = QuantGrid(precision="int8")
    model = linear_model(w)
    PrunePass(config=PruneConfig(PATTERN, method=Method.ALPS, include_head=True, quantize=grid), stats=stats).call(
        model
    )
    pruned = alps(w, stats.gram["w"], PATTERN)
    codes, scales = gptq_quantize(pruned, stats.gram["w"], grid, keep=pruned != 0)
    np.testing.assert_array_equal(initializer(model, "w"), dequantize_codes(codes, scales, grid))
    assert np.all(initializer(model, "w")[pruned == 0] == 0)


def test_quantize_needs_a_reconstructing_method() -> None:
    with pytest.raises(GraphpruneError, match="joint mode of sparsegpt and alps"):
        PruneConfig(PATTERN, method=Method.WANDA, quantize=QuantGrid(precision="int8"))


def test_apply_quantize_cli(tmp_path) -> None:
    rng = np.random.default_rng(5202)  # this function's own data, whatever ran before
    w = rng.standard_normal((16, 32)).astype(np.float32)
    path = tmp_path / "linear.onnx"
    onnx.save(onnx.load_from_string(_proto_bytes(linear_model(w))), str(path))
    x = correlated_inputs(rng, 32, rows=64).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    runner = CliRunner()
    base = ["apply", str(path), "--method", "sparsegpt", "--include-head", "--calib", str(tmp_path / "calib.npz")]
    out = tmp_path / "q.onnx"
    done = runner.invoke(app, [*base, "--quantize", "int4", "--quant-block-size", "32", "-o", str(out), "--json"])
    assert done.exit_code == 0, done.output
    summary = json.loads(done.output[done.output.index("{") :])
    assert summary["quantize"] == {"precision": "int4", "block_size": 32}
    # behind a Transpose, Q/DQ does not reach the weight (as in `quantize`): it stays float, on the grid, listed
    assert [k["name"] for k in summary["qdq"]["kept_float"]] == ["w"] and summary["qdq"]["weights"] == 0
    written = initializer(onnx.load(str(out)), "w")
    grid = QuantGrid(precision="int4", block_size=32)
    codes, scales, _ = sparsegpt_quantize(w, _stats(x).gram["w"], PATTERN, grid)
    np.testing.assert_allclose(written, dequantize_codes(codes, scales, grid), rtol=1e-6, atol=1e-6)

    for bad, message in (
        (["--method", "wanda", "--quantize", "int8"], "joint mode"),
        (["--quantize", "int3"], "--quantize must be"),
        (["--quant-block-size", "16"], "needs --quantize"),
        (["--quantize", "int4", "--quant-block-size", "0"], "at least 1"),
    ):
        target = tmp_path / "bad.onnx"
        refused = runner.invoke(app, [*base, *bad, "-o", str(target)])
        assert refused.exit_code == 2 and message in refused.output and "Traceback" not in refused.output
        assert not target.exists()


def _proto_bytes(model) -> bytes:  # type: ignore[no-untyped-def]
    import onnx_ir as ir

    return ir.to_proto(model).SerializeToString()
