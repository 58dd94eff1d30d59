"""`apply --method sparsegpt|alps --quantize`: the joint mode writes a Q/DQ model with the solver's own codes and
scales, checked in numpy (dequantized weights), by `check` and by ONNX Runtime against the float model on the grid.

The float model on the grid is the pruning pass's output before the Q/DQ step (the same solver run in memory);
its weights are what the solver computed, ``code · scale``. For layer 1 the codes are also recomputed from the
solver itself (:func:`sparsegpt_quantize` on the calibration Gram matrix of the dense input).
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from typer.testing import CliRunner

from graphprune.algorithms.gptq import sparsegpt_quantize
from graphprune.algorithms.pattern import NMPattern
from graphprune.algorithms.quant_grid import QuantGrid, dequantize_codes
from graphprune.algorithms.scores import Method
from graphprune.calibration import calibrate
from graphprune.calibration.request import CalibrationRequest
from graphprune.cli import app
from graphprune.graph.model_io import load_model
from graphprune.passes.prune import PruneConfig, PrunePass
from graphprune.pipeline.files import prune_file
from graphprune.pipeline.sequential import prune_sequentially
from graphprune.quantize.config import QuantizeConfig
from graphprune.quantize.files import quantize_file
from tests.decoder_models import save_external
from tests.onnx_builders import init, make_model, run, tensor

D, H, OUT = 64, 64, 32
PATTERN = NMPattern(2, 4)
GRIDS = {
    "int8": QuantGrid(precision="int8"),
    "fp8": QuantGrid(precision="fp8"),
    "int4": QuantGrid(precision="int4", block_size=32),
    "int4-g128": QuantGrid(precision="int4", block_size=128),  # K = 64: one block, shorter than 128
}


def mlp_file(tmp_path: Path, seed: int = 1800) -> tuple[Path, np.ndarray]:
    """y = relu(x @ W1) @ W2 (W1 [D, H], W2 [H, OUT], both [K, N]) saved to ``tmp_path``, with calibration x."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((D, H)).astype(np.float32) / 8
    w2 = rng.standard_normal((H, OUT)).astype(np.float32) / 8
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["a"], name="fc1"),
        helper.make_node("Relu", ["a"], ["h"]),
        helper.make_node("MatMul", ["h", "W2"], ["y"], name="fc2"),
    ]
    proto = make_model(
        nodes, [tensor("x", shape=["b", D])], [tensor("y", shape=["b", OUT])], [init(w1, "W1"), init(w2, "W2")]
    )
    path = tmp_path / "mlp.onnx"
    onnx.save(proto, str(path))
    mixing = rng.standard_normal((D, D)).astype(np.float32) / 4  # correlated inputs: the solver's update matters
    x = (rng.standard_normal((96, D)).astype(np.float32) @ mixing).astype(np.float32)
    return path, x


def request(x: np.ndarray) -> CalibrationRequest:
    return CalibrationRequest(data=[{"x": x[:48]}, {"x": x[48:]}])


def float_on_grid(path: Path, config: PruneConfig, x: np.ndarray) -> tuple[ir.Model, dict]:
    """The pruning pass's output in memory (the float model on the grid) and the calibration's Gram matrices."""
    model = load_model(path)
    targets = PrunePass(config=config).plan(model)[0]
    stats = calibrate(path, CalibrationRequest(data=request(x).data, gram=True), targets)
    PrunePass(config=config, stats=stats).call(model)
    return model, stats.gram


def dequantized_weights(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per weight behind DequantizeLinear: its codes and ``code · scale`` in float32, computed in numpy."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in values or node.input[0].endswith("_scale"):
            continue
        codes, scale = values[node.input[0]], values[node.input[1]].astype(np.float32)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if scale.ndim == 0:  # an activation's constant, not a weight
            continue
        block = attrs.get("block_size", 0)
        if block:  # [K / block, N] scales along K (axis 0 of a MatMul weight)
            full = np.repeat(scale, block, axis=attrs["axis"])
        else:  # one scale per output channel (axis 1 of a [K, N] weight)
            full = scale.reshape([-1 if a == attrs["axis"] else 1 for a in range(codes.ndim)])
        found[node.input[0]] = (codes, codes.astype(np.float32) * full)
    return found


@pytest.mark.parametrize(
    ("precision", "method"),
    [("int4", "sparsegpt"), ("int8", "sparsegpt"), ("fp8", "sparsegpt"), ("int4", "alps"), ("int4-g128", "alps")],
)
def test_joint_mode_writes_the_solvers_codes_as_qdq(tmp_path: Path, precision: str, method: str) -> None:
    path, x = mlp_file(tmp_path)
    grid = GRIDS[precision]
    precision = grid.precision
    config = PruneConfig(PATTERN, method=Method(method), include_head=True, quantize=grid)
    out, result = prune_file(path, config, tmp_path / "joint.onnx", calibration=request(x))
    written = onnx.load(str(out))
    reference, gram = float_on_grid(path, config, x)

    # 1. every pruned weight is stored as codes whose DequantizeLinear gives the solver's weights bit for bit
    weights = dequantized_weights(written)
    assert sorted(weights) == ["W1", "W2"]
    for name, (codes, values) in weights.items():
        on_grid = reference.graph.initializers[name].const_value.numpy()  # type: ignore[union-attr]
        np.testing.assert_array_equal(values, on_grid)
        expected_type = {"int8": np.int8, "fp8": ml_dtypes.float8_e4m3fn, "int4": ml_dtypes.int4}[precision]
        assert codes.dtype == np.dtype(expected_type)
        # 2. N:M holds on the integer (or fp8) codes themselves, along K (axis 0 of a MatMul weight)
        nonzero = codes.astype(np.float32) != 0
        assert nonzero.reshape(codes.shape[0] // 4, 4, -1).sum(axis=1).max() <= 2
        assert 0.49 < 1 - nonzero.mean() <= 0.5 + 0.02  # about half the weights pruned
    if method == "sparsegpt":  # layer 1's input is the data itself: the solver run on its own gives the codes
        w1 = onnx.numpy_helper.to_array(next(t for t in onnx.load(str(path)).graph.initializer if t.name == "W1"))
        codes, scales, _ = sparsegpt_quantize(w1.T.copy(), gram["W1"], PATTERN, grid)
        np.testing.assert_array_equal(weights["W1"][1], dequantize_codes(codes, scales, grid).T)
        np.testing.assert_array_equal(weights["W1"][0].astype(np.float32), codes.T.astype(np.float32))

    # 3. activations: Q/DQ for int8 and fp8 (symmetric, zero point 0), none for int4 (weight-only)
    quantized = [n for n in written.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantized) == (0 if precision == "int4" else 2)
    qdq = result.to_dict()["qdq"]
    assert [w["method"] for w in qdq["weights"]] == [f"{method}+{precision}"] * 2
    assert all(w["relative_error"] == 0.0 for w in qdq["weights"])  # the float weights were on the grid already
    assert json.loads((tmp_path / "joint.report.json").read_text())["qdq"]["precision"] == precision

    # 4. ONNX Runtime runs it; int4 is weight-only, so it computes the float model on the grid
    feeds = {"x": x[:16]}
    got, on_grid = run(written, feeds)[0], run(reference, feeds)[0]
    if precision == "int4":
        np.testing.assert_allclose(got, on_grid, rtol=1e-5, atol=1e-5)
        # with ONNX Runtime's optimiser, which fuses DequantizeLinear → MatMul into MatMulNBits (float compute)
        options = ort.SessionOptions()
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        fused = ort.InferenceSession(written.SerializeToString(), options, providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(fused.run(None, feeds)[0], on_grid, rtol=1e-5, atol=1e-5)
    else:  # activation rounding only: close, not equal
        assert np.linalg.norm(got - on_grid) / np.linalg.norm(on_grid) < 0.1


def test_joint_activation_scales_are_those_quantize_writes(tmp_path: Path) -> None:
    """The activation Q/DQ of a joint W8A8 model is `quantize`'s on the float model on the grid, same data."""
    path, x = mlp_file(tmp_path, seed=1801)
    config = PruneConfig(PATTERN, method=Method.SPARSEGPT, include_head=True, quantize=GRIDS["int8"])
    out, _ = prune_file(path, config, tmp_path / "joint.onnx", calibration=request(x))
    reference, _ = float_on_grid(path, config, x)
    grid_path = tmp_path / "grid.onnx"
    ir.save(reference, grid_path)
    separate, _ = quantize_file(grid_path, QuantizeConfig(precision="int8", include_head=True), None, request(x))

    def activation_scales(file: Path) -> dict[str, float]:
        model = onnx.load(str(file))
        values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        return {n.input[0]: float(values[n.input[1]]) for n in model.graph.node if n.op_type == "QuantizeLinear"}

    joint_scales = activation_scales(out)
    assert sorted(joint_scales) == ["h", "x"]
    assert joint_scales == activation_scales(separate)


def test_check_reads_the_joint_model(tmp_path: Path) -> None:
    path, x = mlp_file(tmp_path, seed=1802)
    np.savez(tmp_path / "calib.npz", x=x)
    out = tmp_path / "joint.onnx"
    runner = CliRunner()
    base = ["apply", str(path), "--method", "sparsegpt", "--include-head", "--calib", str(tmp_path / "calib.npz")]
    done = runner.invoke(app, [*base, "--quantize", "int4", "--quant-block-size", "32", "-o", str(out)])
    assert done.exit_code == 0, done.output
    assert "Q/DQ" in done.output
    checked = runner.invoke(app, ["check", str(out), "--include-head", "--json"])
    assert checked.exit_code == 0, checked.output
    verdict = json.loads(checked.output[checked.output.index("{") :])
    assert verdict["ok"] and sorted(w["name"] for w in verdict["weights"]) == ["W1", "W2"]
    assert all(w["bad_groups"] == 0 and w["sparsity"] >= 0.5 for w in verdict["weights"])


@pytest.mark.parametrize(
    ("extra", "external", "message"),
    [
        (["--quantize", "int8", "--quant-block-size", "32"], False, "blocks along K are for int4"),
        (["--quantize", "int4", "--quant-block-size", "16"], False, "block size 16"),
        (["--quantize", "int4", "--sequential"], True, "segment by segment"),
    ],
)
def test_joint_mode_refuses_in_one_line(tmp_path: Path, extra: list[str], external: bool, message: str) -> None:
    path, x = mlp_file(tmp_path, seed=1803)
    if external:
        path = save_external(onnx.load(str(path)), tmp_path / "ext" / "mlp.onnx")
    np.savez(tmp_path / "calib.npz", x=x)
    before = path.read_bytes()
    target = tmp_path / "bad.onnx"
    args = ["apply", str(path), "--method", "sparsegpt", "--calib", str(tmp_path / "calib.npz"), *extra]
    refused = CliRunner().invoke(app, [*args, "-o", str(target)])
    assert refused.exit_code == 2, refused.output
    assert message in refused.output and "Traceback" not in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    assert not target.exists() and path.read_bytes() == before


def test_sequential_joint_mode_writes_qdq(tmp_path: Path) -> None:
    """`--sequential`: each layer solved on the already pruned and rounded layers' outputs, written as Q/DQ."""
    path, x = mlp_file(tmp_path, seed=1804)
    config = PruneConfig(PATTERN, method=Method.SPARSEGPT, include_head=True, quantize=GRIDS["int4"])
    out, _ = prune_file(path, config, tmp_path / "joint.onnx", calibration=request(x), sequential="block")
    reference = load_model(path)
    batches, _ = request(x).batches(reference)
    prune_sequentially(reference, config, batches, sequential="block")
    written = onnx.load(str(out))
    weights = dequantized_weights(written)
    assert sorted(weights) == ["W1", "W2"]
    for name, (_, values) in weights.items():
        np.testing.assert_array_equal(values, reference.graph.initializers[name].const_value.numpy())  # type: ignore[union-attr]
    np.testing.assert_allclose(run(written, {"x": x})[0], run(reference, {"x": x})[0], rtol=1e-5, atol=1e-5)
