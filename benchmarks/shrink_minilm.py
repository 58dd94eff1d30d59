"""MiniLM sentence embeddings with 25% of MLP neurons and 25% of attention heads removed, for each of
``--variants`` (``METHOD[+refit][+global]``, benchmarks/shrink_variants.py), in ``--steps`` calibrated rounds or
``--sequential``.

Calibrates on 64 Brown calibration paragraphs, then compares on 64 held-out paragraphs (128 tokens, padded; none
of them seen in calibration): mean cosine of the shrunk model's sentence embeddings to the dense ones, how many
stay nearest their own paragraph, and ONNX Runtime CPU latency of the whole batch, dense and shrunk alternately
in one process, every variant in turn (medians, with the CPU seconds of those runs and the load average around
them; ``--repeats 0`` skips the latency). ``--split`` also scores every variant on two splits of the *calibration*
text that it never calibrates on (up to 512 calibration paragraphs): ``near``, paragraphs 513-576 (news, the
calibration paragraphs' own genre), and ``spread``, 64 paragraphs evenly spaced over paragraphs 1025 to the end
(every genre of the calibration text, as the held-out paragraphs are of another genre than the calibration ones).
Settings are chosen on a split, so that the held-out paragraphs are only reported. ``--unpadded`` calibrates on
each paragraph's real tokens alone (no padded position in the statistics). ``--calib-draw spread`` calibrates on
paragraphs evenly spaced over the whole calibration text (every genre in it, none of the two splits' paragraphs)
instead of its first ones (round 1's protocol: the first 576 paragraphs are all news).
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
import shutil
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
                config = ShrinkConfig(
                    ratio=args.ratio, units=units, method=method, refit=False, allocate="uniform"
                )
                shrink_file(
                    model, config, path, force=True, calibration=CalibrationRequest(data=calib, batch_size=16)
                )
                (e,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run([args.output], held)
                e = e / np.linalg.norm(e, axis=-1, keepdims=True)
                table.setdefault("+".join(units), {})[method.value] = round(float((dense * e).sum(-1).mean()), 4)
    return table


def timings(model: Path, calib: dict, args: argparse.Namespace) -> None:
    """``shrink_file`` with each variant in turn, ``--time-rounds`` rounds in this process (every variant sees
    the same load): CPU seconds of each call, and each variant's median over the first variant's."""
    cpu: dict[str, list[float]] = {name: [] for name in args.variants}
    with tempfile.TemporaryDirectory(prefix="graphprune-shrink-time-") as tmp:
        for _ in range(args.time_rounds):
            for name in args.variants:
                config = variant(name, args.ratio, ("mlp", "heads"), damp=args.damp)
                request = CalibrationRequest(data=calib, batch_size=16)
                t = time.process_time()
                shrink_file(model, config, Path(tmp) / "m.onnx", force=True, calibration=request)
                cpu[name].append(round(time.process_time() - t, 2))
                print(name, cpu[name][-1], flush=True)
    base = statistics.median(cpu[args.variants[0]])
    result = {
        "model": str(model),
        "calibration": f"{len(calib['input_ids'])} paragraphs, padded to 128",
        "rounds": args.time_rounds,
        "cpu_s": cpu,
        "median_over_first": {n: round(statistics.median(v) / base, 3) for n, v in cpu.items()},
        "load_average": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result, indent=1))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--output", default="461", help="the sentence-embedding output (L3: 461)")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=1, help="shrink in this many calibrated rounds")
    parser.add_argument("--sequential", action="store_true", help="one group at a time on the shrunk prefix")
    parser.add_argument("--damp", type=float, default=0.1, help="the refit's and obs's damping")
    parser.add_argument("--split", action="store_true", help="also score on the near and spread splits")
    parser.add_argument("--unpadded", action="store_true", help="calibrate on each paragraph's real tokens only")
    parser.add_argument(
        "--variants", nargs="*", default=["flap", "flap+refit", "obs+refit", "obs+refit+global"], help="see below"
    )
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "shrink_minilm.json")
    parser.add_argument(
        "--ablation", action="store_true", help="instead: mean cosine per method (l2, wanda, flap) and unit kind"
    )
    parser.add_argument(
        "--time-rounds",
        type=int,
        default=0,
        help="instead: shrink with every variant in turn, this many rounds in this process; CPU seconds each",
    )
    parser.add_argument("--calib-paragraphs", type=int, default=64, help="calibration paragraphs (default 64)")
    parser.add_argument(
        "--calib-draw",
        choices=["first", "spread"],
        default="first",
        help="first: the calibration text's first paragraphs (round 1's protocol; all news); spread: evenly "
        "spaced over the whole calibration text (every genre), skipping the near and spread splits' paragraphs",
    )
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="copy each shrunk model to DIR/NAME_PARAGRAPHS.onnx (as the latency "
        "benchmark names them: it then times those files)",
    )
    args = parser.parse_args()
    import onnxruntime as ort

    model = args.model or demo.minilm_l3()
    tokenizer = demo.all_minilm_l6() / "tokenizer.json"
    calibration, heldout = demo.brown_split()

    def paragraphs(text: str, count: int = 64) -> list[str]:
        return [p for p in text.split("\n\n") if len(p) > 80][:count]

    everything = paragraphs(calibration, 10**9)
    step = (len(everything) - 1024) // 64
    near, spread = range(512, 576), range(1024, 1024 + 64 * step, step)  # the splits' paragraph indices
    if args.calib_draw == "spread":
        unused = sorted(set(range(len(everything))) - set(near) - set(spread))
        drawn = [everything[i] for i in unused[:: len(unused) // args.calib_paragraphs][: args.calib_paragraphs]]
    else:
        if args.split and args.calib_paragraphs > 512:
            parser.error("--split scores on calibration paragraphs from 513 on: calibrate on at most 512")
        drawn = everything[: args.calib_paragraphs]
    calib = feeds(tokenizer, drawn)
    splits = {
        "near": feeds(tokenizer, [everything[i] for i in near]),
        "spread": feeds(tokenizer, [everything[i] for i in spread]),
    }
    splits = splits if args.split else {}
    held = feeds(tokenizer, paragraphs(heldout))
    if args.time_rounds:
        timings(model, calib, args)
        return
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
    sessions = {"dense": ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])}

    def embed(session: ort.InferenceSession, batch: dict[str, np.ndarray]) -> np.ndarray:
        (e,) = session.run([args.output], batch)
        return e / np.linalg.norm(e, axis=-1, keepdims=True)

    dense = embed(sessions["dense"], held)
    dense_splits = {k: embed(sessions["dense"], batch) for k, batch in splits.items()}
    if args.unpadded:  # every paragraph alone, its real tokens only: no padded position in the statistics
        lengths = calib["attention_mask"].sum(axis=1)
        calib = [{k: v[i : i + 1, : lengths[i]] for k, v in calib.items()} for i in range(len(lengths))]
    rows = []
    with tempfile.TemporaryDirectory(prefix="graphprune-shrink-minilm-") as tmp:
        for name in args.variants:
            path = Path(tmp) / f"{name}.onnx"
            text = name + ("+seq" if args.sequential and "+seq" not in name else "")
            config = variant(text, args.ratio, ("mlp", "heads"), steps=args.steps, damp=args.damp)
            wall, cpu = time.perf_counter(), time.process_time()
            _, report = shrink_file(model, config, path, calibration=CalibrationRequest(data=calib, batch_size=16))
            if args.keep:
                args.keep.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, args.keep / f"{name}_{args.calib_paragraphs}.onnx")
            cost = _since(wall, cpu)
            sessions[name] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            e = embed(sessions[name], held)
            on_split = {
                f"{k}_mean_cosine": round(float((dense_splits[k] * embed(sessions[name], b)).sum(-1).mean()), 4)
                for k, b in splits.items()
            }
            cosine = (dense * e).sum(axis=-1)
            nearest = np.argmax(e @ dense.T, axis=1) == np.arange(len(cosine))
            row = {
                "variant": name,
                "steps": args.steps,
                "sequential": args.sequential,
                "groups": [(g.kind, g.units_before, g.units_after) for g in report.groups],
                "layer_ratios": [g.ratio for g in report.groups],
                "mean_cosine": round(float(cosine.mean()), 4),
                "min_cosine": round(float(cosine.min()), 4),
                "nearest_own_paragraph": f"{int(nearest.sum())}/{len(nearest)}",
                "shrink": cost,
                **on_split,
                "parameters_before": report.parameters_before,
                "parameters_after": report.parameters_after,
                "file_smaller": round(1 - path.stat().st_size / Path(model).stat().st_size, 4),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        times: dict[str, list[float]] = {n: [] for n in sessions}
        cpu_times = dict.fromkeys(sessions, 0.0)
        load_before = os.getloadavg()[0]
        for _ in range(args.repeats):  # every model in turn: they all see the same load
            for name, s in sessions.items():
                t, c = time.perf_counter(), time.process_time()
                s.run([args.output], held)
                times[name].append(time.perf_counter() - t)
                cpu_times[name] += time.process_time() - c
        load_after = os.getloadavg()[0]
    dense_s = statistics.median(times["dense"]) if args.repeats else float("nan")
    for row in rows if args.repeats else []:
        row["latency_s"] = round(statistics.median(times[row["variant"]]), 4)
        row["speedup"] = round(dense_s / row["latency_s"], 3)
        row["runs_cpu_s"] = round(cpu_times[row["variant"]], 1)
    result = {
        "model": str(model),
        "ratio": args.ratio,
        "units": "mlp,heads",
        "calibration": f"{args.calib_paragraphs} paragraphs ({args.calib_draw}), "
        + ("unpadded" if args.unpadded else "padded to 128"),
        "damp": args.damp,
        "batch": list(held["input_ids"].shape),
        "repeats": args.repeats,
        "latency_dense_s": round(dense_s, 4) if args.repeats else None,
        "runs_cpu_s_dense": round(cpu_times["dense"], 1),
        "load_average": [round(load_before, 2), round(load_after, 2)],
        "variants": rows,
    }
    print(json.dumps(result, indent=1))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
