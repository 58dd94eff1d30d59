"""MiniLM sentence embeddings with 25% of MLP neurons and 25% of attention heads removed (flap), in one round and
in ``--steps`` calibrated rounds.

Calibrates on 64 Brown calibration paragraphs, then compares on 64 held-out paragraphs (128 tokens, padded; none
of them seen in calibration): mean cosine of the shrunk model's sentence embeddings to the dense ones, how many
stay nearest their own paragraph, and ONNX Runtime CPU latency of the whole batch, dense and shrunk alternately
in one process (medians, with the CPU seconds of those runs and the load average around them).
Default model: paraphrase-MiniLM-L3-v2 from PyPI; all-MiniLM-L6-v2 is exported (mean pooling included) by
``benchmarks/export_all_minilm_l6.py``:

    nice -n 10 python benchmarks/shrink_minilm.py [--ratio 0.25] [--repeats 9]
    nice -n 10 python benchmarks/shrink_minilm.py --model /tmp/graphprune-all-minilm-l6/model.onnx \
        --output sentence_embedding --json benchmarks/results/shrink_all_minilm_l6.json
    nice -n 10 python benchmarks/shrink_minilm.py --model ... --ablation --json ...  # methods x unit kinds
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

from graphprune.algorithms.structured import StructuredMethod
from graphprune.calibration.request import CalibrationRequest
from graphprune.pipeline.shrink import ShrinkConfig, shrink_file


def feeds(tokenizer_path: Path, paragraphs: list[str], seqlen: int = 128) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.enable_truncation(seqlen)
    tokenizer.enable_padding(length=seqlen)
    encoded = tokenizer.encode_batch(paragraphs)
    return {
        "input_ids": np.array([e.ids for e in encoded], np.int64),
        "attention_mask": np.array([e.attention_mask for e in encoded], np.int64),
    }


def _since(wall: float, cpu: float) -> dict[str, float]:
    return {"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1)}


def ablation(
    model: Path, args: argparse.Namespace, calib: dict, held: dict, dense: np.ndarray
) -> dict[str, dict[str, float]]:
    """Mean cosine to the dense embeddings for each method and unit kind alone (one round each)."""
    import onnxruntime as ort

    table: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="graphprune-shrink-ablation-") as tmp:
        for units in (("mlp",), ("heads",), ("mlp", "heads")):
            for method in StructuredMethod:
                path = Path(tmp) / "m.onnx"
                config = ShrinkConfig(ratio=args.ratio, units=units, method=method)
                shrink_file(
                    model, config, path, force=True, calibration=CalibrationRequest(data=calib, batch_size=16)
                )
                (e,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run([args.output], held)
                e = e / np.linalg.norm(e, axis=-1, keepdims=True)
                table.setdefault("+".join(units), {})[method.value] = round(float((dense * e).sum(-1).mean()), 4)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--output", default="461", help="the sentence-embedding output (L3: 461)")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=4, help="also shrink in this many calibrated rounds")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "shrink_minilm.json")
    parser.add_argument(
        "--ablation", action="store_true", help="instead: mean cosine per method (l2, wanda, flap) and unit kind"
    )
    args = parser.parse_args()
    import onnxruntime as ort

    model = args.model or demo.minilm_l3()
    tokenizer = demo.all_minilm_l6() / "tokenizer.json"
    calibration, heldout = demo.brown_split()

    def paragraphs(text: str) -> list[str]:
        return [p for p in text.split("\n\n") if len(p) > 80][:64]

    calib, held = feeds(tokenizer, paragraphs(calibration)), feeds(tokenizer, paragraphs(heldout))
    if args.ablation:
        (dense,) = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run([args.output], held)
        dense = dense / np.linalg.norm(dense, axis=-1, keepdims=True)
        table = {
            "model": str(model),
            "ratio": args.ratio,
            "mean_cosine": ablation(model, args, calib, held, dense),
        }
        print(json.dumps(table, indent=1))
        args.json.write_text(json.dumps(table, indent=1) + "\n")
        return
    with tempfile.TemporaryDirectory(prefix="graphprune-shrink-minilm-") as tmp:
        small = Path(tmp) / "small.onnx"
        config = ShrinkConfig(ratio=args.ratio, units=("mlp", "heads"), method=StructuredMethod.FLAP)
        wall, cpu = time.perf_counter(), time.process_time()
        _, report = shrink_file(model, config, small, calibration=CalibrationRequest(data=calib, batch_size=16))
        shrink_cost = {
            "wall_s": round(time.perf_counter() - wall, 1),
            "cpu_s": round(time.process_time() - cpu, 1),
        }
        sessions = {
            n: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
            for n, p in (("dense", model), ("shrunk", small))
        }
        embeddings = {}
        for name, s in sessions.items():
            (e,) = s.run([args.output], held)
            embeddings[name] = e / np.linalg.norm(e, axis=-1, keepdims=True)
        times: dict[str, list[float]] = {"dense": [], "shrunk": []}
        cpu_times = {"dense": 0.0, "shrunk": 0.0}
        load_before = os.getloadavg()[0]
        for _ in range(args.repeats):
            for name, s in sessions.items():
                t, c = time.perf_counter(), time.process_time()
                s.run([args.output], held)
                times[name].append(time.perf_counter() - t)
                cpu_times[name] += time.process_time() - c
        load_after = os.getloadavg()[0]
        sizes = {"dense": Path(model).stat().st_size, "shrunk": small.stat().st_size}
        rounds = Path(tmp) / "rounds.onnx"
        config = ShrinkConfig(
            ratio=args.ratio, units=("mlp", "heads"), method=StructuredMethod.FLAP, steps=args.steps
        )
        wall, cpu = time.perf_counter(), time.process_time()
        shrink_file(model, config, rounds, calibration=CalibrationRequest(data=calib, batch_size=16))
        rounds_cost = {
            "wall_s": round(time.perf_counter() - wall, 1),
            "cpu_s": round(time.process_time() - cpu, 1),
        }
        (e,) = ort.InferenceSession(str(rounds), providers=["CPUExecutionProvider"]).run([args.output], held)
        embeddings["rounds"] = e / np.linalg.norm(e, axis=-1, keepdims=True)
    cosine = (embeddings["dense"] * embeddings["shrunk"]).sum(axis=-1)
    nearest = np.argmax(embeddings["shrunk"] @ embeddings["dense"].T, axis=1) == np.arange(len(cosine))
    nearest_rounds = np.argmax(embeddings["rounds"] @ embeddings["dense"].T, axis=1) == np.arange(len(cosine))
    dense_s, small_s = statistics.median(times["dense"]), statistics.median(times["shrunk"])
    result = {
        "model": str(model),
        "ratio": args.ratio,
        "units": "mlp,heads",
        "method": "flap",
        "groups": [(g.kind, g.units_before, g.units_after) for g in report.groups],
        "mean_cosine": round(float(cosine.mean()), 4),
        "min_cosine": round(float(cosine.min()), 4),
        "nearest_own_paragraph": f"{int(nearest.sum())}/{len(nearest)}",
        "steps": args.steps,
        f"mean_cosine_{args.steps}_rounds": round(
            float((embeddings["dense"] * embeddings["rounds"]).sum(-1).mean()), 4
        ),
        f"nearest_own_paragraph_{args.steps}_rounds": f"{int(nearest_rounds.sum())}/{len(nearest)}",
        "shrink_1_round": shrink_cost,
        f"shrink_{args.steps}_rounds": rounds_cost,
        "batch": list(held["input_ids"].shape),
        "repeats": args.repeats,
        "latency_dense_s": round(dense_s, 4),
        "latency_shrunk_s": round(small_s, 4),
        "speedup": round(dense_s / small_s, 3),
        "runs_cpu_s": {k: round(v, 1) for k, v in cpu_times.items()},
        "load_average": [round(load_before, 2), round(load_after, 2)],
        "skipped": len(report.skipped),
        "parameters_before": report.parameters_before,
        "parameters_after": report.parameters_after,
        "file_smaller": round(1 - sizes["shrunk"] / sizes["dense"], 4),
    }
    print(json.dumps(result, indent=1))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
