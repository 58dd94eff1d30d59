"""ONNX Runtime CPU speed of quantized models against their FP32 original: interleaved rounds, one process.

Each model gets one session (ONNX Runtime's default graph optimisations: its QDQ fusions turn DequantizeLinear →
MatMul pairs into integer kernels); every round runs each session once on the same feed, in turn, so a load change
on the shared machine hits all of them alike. Reported per model: median CPU seconds per run (user + system of
this process, all threads), median wall seconds, and both as speed-ups over the first (FP32) model; the machine's
load average before and after the rounds (the shared machine's other jobs slow memory-bound kernels even in CPU
seconds); with ``--ops``, how many nodes of each type ONNX Runtime's optimised graph holds (which MatMuls became
integer kernels, which fusions happened).

    python benchmarks/quantize_speed.py fp32.onnx int8.onnx [more.onnx ...] --seqlen 512 --rounds 7 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort


def feed_for(session: ort.InferenceSession, seqlen: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids (and an all-ones mask, zero positions) for every input of a text model."""
    rng = np.random.default_rng(seed)
    feed: dict[str, np.ndarray] = {}
    for spec in session.get_inputs():
        if "mask" in spec.name:
            feed[spec.name] = np.ones((1, seqlen), np.int64)
        elif "position" in spec.name:
            feed[spec.name] = np.arange(seqlen, dtype=np.int64)[None]
        elif "type" in spec.name:
            feed[spec.name] = np.zeros((1, seqlen), np.int64)
        else:
            feed[spec.name] = rng.integers(100, 20000, (1, seqlen), dtype=np.int64)
    return feed


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def optimised_ops(path: Path) -> dict[str, int]:
    """Node types of the graph ONNX Runtime runs (its default optimisations), most frequent first."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
        return dict(Counter(n.op_type for n in graph.node).most_common())


def measure(paths: list[Path], seqlen: int, rounds: int, threads: int) -> list[dict]:
    sessions = [session(p, threads) for p in paths]
    feed = feed_for(sessions[0], seqlen)
    names = [[o.name for o in s.get_outputs()][:1] for s in sessions]
    for s, n in zip(sessions, names, strict=True):  # warm-up: allocations, kernel selection
        s.run(n, feed)
    cpu: list[list[float]] = [[] for _ in paths]
    wall: list[list[float]] = [[] for _ in paths]
    for _ in range(rounds):
        for i, (s, n) in enumerate(zip(sessions, names, strict=True)):
            c0, w0 = time.process_time(), time.perf_counter()
            s.run(n, feed)
            cpu[i].append(time.process_time() - c0)
            wall[i].append(time.perf_counter() - w0)
    base_cpu, base_wall = statistics.median(cpu[0]), statistics.median(wall[0])
    return [
        {
            "model": str(p),
            "cpu_s": round(statistics.median(c), 4),
            "wall_s": round(statistics.median(w), 4),
            "cpu_speedup": round(base_cpu / statistics.median(c), 3),
            "wall_speedup": round(base_wall / statistics.median(w), 3),
        }
        for p, c, w in zip(paths, cpu, wall, strict=True)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path, help="the FP32 baseline first, then the models to compare")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1: CPU seconds of one core)")
    parser.add_argument("--results", type=Path, help="append the rows (JSON lines) here")
    parser.add_argument("--ops", action="store_true", help="also record each optimised graph's node types")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    rows = measure(args.models, args.seqlen, args.rounds, args.threads)
    header = {"seqlen": args.seqlen, "rounds": args.rounds, "threads": args.threads, "cpus": os.cpu_count()}
    header["load_average"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
    header["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for row in rows:
        row.update(header)
        if args.ops:
            row["ops"] = optimised_ops(Path(row["model"]))
        print(json.dumps(row))
        if args.results:
            with args.results.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
