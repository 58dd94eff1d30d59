"""Trained CNNs nobody here wrote, 30% of their filters removed: PaddleOCR's text-direction classifier and text
detector as shipped by PyPI ``rapidocr-onnxruntime`` 1.4.4 (MobileNetV3-style: depthwise convolutions, HardSwish,
squeeze-excitation, residual Adds; the detector adds an FPN with Resize, Concat and ConvTranspose).

Inputs are real-looking: Brown corpus sentences rendered as black text on white (Pillow's default font), the
calibration images from the calibration part of the corpus and the evaluation images from the held-out part, each
preprocessed as RapidOCR does. The classifier sees text lines (48x192), half of them rotated by 180 degrees, so
both models' accuracy is measured next to their agreement; the detector sees 320x320 pages of 6 lines, and the
probability maps are compared (Pearson correlation, and IoU of the text masks at DB's 0.3 threshold).
Latency: ONNX Runtime CPU, the same batch, dense and shrunk alternately in one process (medians), with the CPU
seconds of those runs and the load average around them.

Needs Pillow for the rendering (``pip install pillow``; not a graphprune dependency).

    nice -n 10 python benchmarks/shrink_cnn.py [--ratios 0.3] [--methods l2 flap flap+refit] [--round-to 1 8]
        [--repeats 9]

``--methods`` takes ``METHOD[+refit][+global]`` (benchmarks/shrink_variants.py): ``flap+refit`` refits the 1x1
consumers by least squares (kxk consumers keep flap's bias fold), ``+global`` shares the ratio across groups.

``--round-to 8`` leaves a multiple of 8 channels in every group: ONNX Runtime's CPU convolutions use their fast
blocked (NCHWc) layout only then, so without it a smaller model can be slower.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

try:
    from graphprune import demo
except ImportError:  # run as a script from a checkout without installing graphprune
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from graphprune import demo

from shrink_variants import variant  # benchmarks/, beside this script

from graphprune.calibration.request import CalibrationRequest
from graphprune.pipeline.shrink import shrink_file

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def sentences(text: str, count: int, length: int) -> list[str]:
    """``count`` snippets of about ``length`` characters, cut at word boundaries, in corpus order."""
    words = text.split()
    out, line = [], []
    for word in words:
        line.append(word)
        if sum(len(w) + 1 for w in line) >= length:
            out.append(" ".join(line))
            line = []
            if len(out) == count:
                break
    return out


def _render(lines: list[str], width: int, height: int, size: int) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=size)
    step = height // max(len(lines), 1)
    for i, line in enumerate(lines):
        draw.text((4, i * step + (step - size) // 2), line, fill="black", font=font)
    return np.asarray(image, np.float32)


def text_lines(lines: list[str], rotate: bool) -> np.ndarray:
    """RapidOCR's classifier input: a text line resized to height 48 (width at most 192), (x/255 - 0.5)/0.5,
    zero-padded on the right; every other line rotated by 180 degrees when ``rotate``."""
    from PIL import Image

    out = np.zeros((len(lines), 3, 48, 192), np.float32)
    for i, line in enumerate(lines):
        pixels = _render([line], 16 * len(line) + 8, 40, 28)
        if rotate and i % 2:
            pixels = pixels[::-1, ::-1]
        image = Image.fromarray(pixels.astype(np.uint8))
        width = min(192, int(np.ceil(48 * image.width / image.height)))
        resized = np.asarray(image.resize((width, 48)), np.float32)
        out[i, :, :, :width] = ((resized / 255 - 0.5) / 0.5).transpose(2, 0, 1)
    return out


def pages(lines: list[str], per_page: int = 6, side: int = 320) -> np.ndarray:
    """RapidOCR's detector input: pages of ``per_page`` lines, ImageNet-normalised, NCHW."""
    out = []
    for start in range(0, len(lines) - per_page + 1, per_page):
        pixels = _render(lines[start : start + per_page], side, side, 20) / 255
        out.append(((pixels - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


def _timed(sessions: dict, feed: dict[str, np.ndarray], repeats: int) -> dict:
    times: dict[str, list[float]] = {name: [] for name in sessions}
    cpu = dict.fromkeys(sessions, 0.0)
    load_before = os.getloadavg()[0]
    for _ in range(repeats):
        for name, session in sessions.items():
            t, c = time.perf_counter(), time.process_time()
            session.run(None, feed)
            times[name].append(time.perf_counter() - t)
            cpu[name] += time.process_time() - c
    medians = {name: statistics.median(v) for name, v in times.items()}
    return {
        "latency_s": {k: round(v, 4) for k, v in medians.items()},
        "runs_cpu_s": {k: round(v, 2) for k, v in cpu.items()},
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "medians_of": repeats,
    }


def _agreement(kind: str, dense: np.ndarray, small: np.ndarray, labels: np.ndarray | None) -> dict:
    if kind == "cls":
        flat_d, flat_s = dense.reshape(len(dense), -1), small.reshape(len(small), -1)
        cos = (flat_d * flat_s).sum(1) / (np.linalg.norm(flat_d, axis=1) * np.linalg.norm(flat_s, axis=1))
        out = {
            "class_agreement": round(float((dense.argmax(1) == small.argmax(1)).mean()), 4),
            "mean_output_cosine": round(float(cos.mean()), 4),
        }
        if labels is not None:
            out["accuracy_dense"] = round(float((dense.argmax(1) == labels).mean()), 4)
            out["accuracy_shrunk"] = round(float((small.argmax(1) == labels).mean()), 4)
        return out
    d, s = dense.reshape(-1).astype(np.float64), small.reshape(-1).astype(np.float64)
    mask_d, mask_s = d > 0.3, s > 0.3
    union = (mask_d | mask_s).sum()
    return {
        "map_correlation": round(float(np.corrcoef(d, s)[0, 1]), 4),
        "text_mask_iou": round(float((mask_d & mask_s).sum() / union), 4) if union else None,
        "text_fraction_dense": round(float(mask_d.mean()), 4),
        "text_fraction_shrunk": round(float(mask_s.mean()), 4),
    }


def _key(row: dict) -> tuple:
    return row["model"], row["method"], row["ratio"], row["round_to"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="*", default=[0.3])
    parser.add_argument("--round-to", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--methods", nargs="*", default=["l2", "flap"])
    parser.add_argument("--models", nargs="*", default=["cls", "det"])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "shrink_cnn.json")
    args = parser.parse_args()
    import onnxruntime as ort

    calibration_text, heldout_text = demo.brown_split()
    results = json.loads(args.json.read_text())["results"] if args.json.exists() else []  # rows merged by key
    for kind in args.models:
        path = demo.rapidocr_cls() if kind == "cls" else demo.rapidocr_det()
        if kind == "cls":
            calib = text_lines(sentences(calibration_text, 64, 14), rotate=True)
            held = text_lines(sentences(heldout_text, 64, 14), rotate=True)
            labels = np.arange(len(held)) % 2  # label 0: upright, 1: rotated by 180 degrees
        else:
            calib, held, labels = (
                pages(sentences(calibration_text, 96, 28)),
                pages(sentences(heldout_text, 48, 28)),
                None,
            )
        feed = {"x": held}
        dense_session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (dense_out,) = dense_session.run(None, feed)
        with tempfile.TemporaryDirectory(prefix="graphprune-shrink-cnn-") as tmp:
            runs = [(r, m, n) for r in args.ratios for m in args.methods for n in args.round_to]
            for ratio, method, multiple in runs:
                out = Path(tmp) / f"{kind}-{method}-{ratio}-{multiple}.onnx"
                config = variant(method, ratio, ("channels",), round_to=multiple)
                wall, cpu = time.perf_counter(), time.process_time()
                request = CalibrationRequest(data={"x": calib}, batch_size=8)
                _, report = shrink_file(path, config, out, calibration=request)
                shrink_cost = {
                    "wall_s": round(time.perf_counter() - wall, 1),
                    "cpu_s": round(time.process_time() - cpu, 1),
                }
                small_session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
                (small_out,) = small_session.run(None, feed)
                timing = _timed({"dense": dense_session, "shrunk": small_session}, feed, args.repeats)
                row = {
                    "model": path.name,
                    "method": method,
                    "ratio": ratio,
                    "layer_ratios": [g.ratio for g in report.groups],
                    "round_to": multiple,
                    "batch": list(held.shape),
                    "groups_shrunk": len(report.groups),
                    "groups_skipped": len(report.skipped),
                    "skip_reasons": sorted({s.reason for s in report.skipped}),
                    "channels_before": sum(g.units_before for g in report.groups),
                    "channels_after": sum(g.units_after for g in report.groups),
                    "parameters_before": report.parameters_before,
                    "parameters_after": report.parameters_after,
                    "file_bytes": {"dense": path.stat().st_size, "shrunk": out.stat().st_size},
                    "shrink": shrink_cost,
                    **timing,
                    "speedup": round(timing["latency_s"]["dense"] / timing["latency_s"]["shrunk"], 3),
                    **_agreement(kind, dense_out, small_out, labels),
                }
                results = [r for r in results if _key(r) != _key(row)] + [row]
                print(json.dumps(row), flush=True)
                out.unlink()
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({"results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
