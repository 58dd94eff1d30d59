"""The library is the command line's equal: every command has a library call, used here without the CLI."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper

import graphprune
from graphprune.errors import GraphpruneError
from tests.onnx_builders import IR_VERSION, run

MLP = """
< ir_version: 8, opset_import: ["" : 17] >
mlp (float[B, 16] x) => (float[B, 16] y, float[B, 16] p) {
    h = MatMul(x, w1)
    a = Relu(h)
    y = MatMul(a, w2)
    p = Softmax<axis = -1>(y)
}
"""


def mlp(seed: int, scale: float = 1.0) -> onnx.ModelProto:
    """x -> MatMul -> Relu -> MatMul (-> Softmax) with 2:4 weights along K (every other row of each group zero)."""
    rng = np.random.default_rng(seed)
    model = onnx.parser.parse_model(MLP)
    model.ir_version = IR_VERSION
    for name, shape in (("w1", (16, 32)), ("w2", (32, 16))):
        weight = (rng.standard_normal(shape) * scale / np.sqrt(shape[0])).astype(np.float32)
        weight[1::2] = 0.0  # K is axis 0 of a MatMul B: 2 of every 4 consecutive rows kept
        model.graph.initializer.append(numpy_helper.from_array(weight, name))
    return model


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_dir_lists_the_public_api() -> None:
    listed = set(dir(graphprune))
    wanted = {"ShrinkPass", "WeightReport", "Statistics", "ActivationStats", "PrunePass", "prune_file"}
    wanted |= {"convert_file", "evaluate_files", "build_engine", "check_file", "shrink_file", "calibrate"}
    assert wanted <= listed
    assert set(graphprune.__all__) <= listed
    for name in graphprune.__all__:
        assert getattr(graphprune, name).__module__.startswith("graphprune"), name


def test_import_graphprune_loads_none_of_the_heavy_modules() -> None:
    heavy = "{'onnx', 'onnx_ir', 'onnxruntime'}"
    probe = f"import sys, graphprune; dir(graphprune); print(sorted({heavy} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_convert_file_keeps_zeros_and_outputs(tmp_path: Path) -> None:
    source = tmp_path / "m.onnx"
    onnx.save_model(mlp(0), str(source))
    before = digest(source)
    result = graphprune.convert_file(source)
    assert result.output == tmp_path / "m.fp16.onnx" and result.output.is_file()
    assert digest(source) == before
    converted = onnx.load_model(str(result.output))
    halves = {t.name: numpy_helper.to_array(t) for t in converted.graph.initializer if t.name in ("w1", "w2")}
    for name, original in ((t.name, numpy_helper.to_array(t)) for t in mlp(0).graph.initializer):
        assert halves[name].dtype == np.float16
        np.testing.assert_array_equal(halves[name] == 0, original == 0)  # every pruned zero, and only those
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    for got, want in zip(run(converted, {"x": x}), run(mlp(0), {"x": x}), strict=True):
        assert got.dtype == np.float32  # the FP32 interface stays
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)
    assert sorted(r.name for r in result.eligibility) == ["w1", "w2"]
    assert sorted(result.conversion.converted) == ["w1", "w2"]


def test_convert_file_refuses_to_replace_without_force(tmp_path: Path) -> None:
    source, target = tmp_path / "m.onnx", tmp_path / "m.bf16.onnx"
    onnx.save_model(mlp(0), str(source))
    target.write_bytes(b"not mine to replace")
    with pytest.raises(GraphpruneError, match=r"exists; pass `force=True`"):
        graphprune.convert_file(source, dtype="bfloat16")
    assert target.read_bytes() == b"not mine to replace"
    graphprune.convert_file(source, dtype="bfloat16", force=True)
    weights = {t.name: t.data_type for t in onnx.load_model(str(target)).graph.initializer}
    assert weights["w1"] == weights["w2"] == onnx.TensorProto.BFLOAT16
    with pytest.raises(GraphpruneError, match="`dtype`"):
        graphprune.convert_file(source, tmp_path / "x.onnx", dtype="float8")  # type: ignore[arg-type]


def test_evaluate_files_matches_numpy_on_onnxruntime_outputs(tmp_path: Path) -> None:
    dense, pruned = tmp_path / "dense.onnx", tmp_path / "pruned.onnx"
    onnx.save_model(mlp(0), str(dense))
    onnx.save_model(_perturbed(mlp(0)), str(pruned))
    x = np.random.default_rng(2).standard_normal((10, 16)).astype(np.float32)
    np.savez(tmp_path / "held.npz", x=x)
    seen: list[tuple[str, int, int]] = []
    result = graphprune.evaluate_files(
        dense, pruned, calib=tmp_path / "held.npz", batch_size=4, progress=lambda *step: seen.append(step)
    )
    assert seen[-1] == ("comparing outputs", 10, 10)
    assert result.windows is None and result.perplexity_dense is None
    pairs = zip(run(mlp(0), {"x": x}), run(_perturbed(mlp(0)), {"x": x}), strict=True)
    references = dict(zip(("y", "p"), pairs, strict=True))
    assert sorted(r.name for r in result.outputs or []) == ["p", "y"]
    for row in result.outputs or []:
        a, b = (v.astype(np.float64) for v in references[row.name])
        cosine = np.mean([ai @ bi / np.linalg.norm(ai) / np.linalg.norm(bi) for ai, bi in zip(a, b, strict=True)])
        assert row.samples == 10
        assert row.cosine == pytest.approx(cosine, rel=1e-6)
        assert row.relative_l2 == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(a), rel=1e-6)
        assert row.top1_agreement == pytest.approx(np.mean(a.argmax(-1) == b.argmax(-1)))
    assert result.to_dict()["outputs"][0]["samples"] == 10


def _perturbed(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with every kept weight of w2 nudged: outputs close to, but not equal to, the original's."""
    w2 = next(t for t in model.graph.initializer if t.name == "w2")
    values = numpy_helper.to_array(w2).copy()
    values[::4] *= 0.5
    w2.CopyFrom(numpy_helper.from_array(values, "w2"))
    return model


def test_evaluate_files_needs_something_to_evaluate_on(tmp_path: Path) -> None:
    with pytest.raises(GraphpruneError, match="give `calib` data, `text` or `token_windows`"):
        graphprune.evaluate_files(tmp_path / "a.onnx", tmp_path / "b.onnx")
