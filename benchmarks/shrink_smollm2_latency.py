"""SmolLM2-135M, 25% of MLP neurons removed: ONNX Runtime CPU latency and file size against the dense model.

Both models run the same 8x512-token batch (the first 8 Brown held-out windows) in one process, alternately, after
one warm-up run each; the ratio is of the medians. The shrunk model is written by ``shrink --units mlp --ratio 0.25
--method l2`` (latency and size do not depend on which units go).

    nice -n 10 python benchmarks/shrink_smollm2_latency.py [--model PATH] [--repeats 7] [--threads 0]
"""

from __future__ import annotations

import argparse
import json
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

from graphprune.pipeline.shrink import ShrinkConfig, shrink_file

REFERENCE = Path("/work/shared/reference")


def session(path: Path, threads: int):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=demo.cache_dir() / "smollm2" / "model.onnx")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime's default)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    windows = np.load(REFERENCE / "smollm2_brown_eval.npz")["input_ids"][:8, 1:]  # 8 x 512, BOS dropped
    feed = {"input_ids": windows.astype(np.int64), "attention_mask": np.ones_like(windows, dtype=np.int64)}
    with tempfile.TemporaryDirectory(prefix="graphprune-shrink-bench-") as tmp:
        small_path = Path(tmp) / "shrunk.onnx"
        t0 = time.perf_counter()
        _, report = shrink_file(args.model, ShrinkConfig(ratio=args.ratio, units=("mlp",)), small_path)
        shrink_seconds = time.perf_counter() - t0
        dense, small = session(args.model, args.threads), session(small_path, args.threads)
        outputs = ["logits"]
        for s in (dense, small):
            s.run(outputs, feed)  # warm-up
        times: dict[str, list[float]] = {"dense": [], "shrunk": []}
        for _ in range(args.repeats):
            for name, s in (("dense", dense), ("shrunk", small)):
                t = time.perf_counter()
                s.run(outputs, feed)
                times[name].append(time.perf_counter() - t)
        dense_s, small_s = statistics.median(times["dense"]), statistics.median(times["shrunk"])
        sizes = {"dense": args.model.stat().st_size, "shrunk": small_path.stat().st_size}
    result = {
        "model": str(args.model),
        "units": "mlp",
        "ratio": args.ratio,
        "batch": list(windows.shape),
        "repeats": args.repeats,
        "shrink_seconds": round(shrink_seconds, 1),
        "latency_dense_s": round(dense_s, 3),
        "latency_shrunk_s": round(small_s, 3),
        "speedup": round(dense_s / small_s, 3),
        "file_dense_bytes": sizes["dense"],
        "file_shrunk_bytes": sizes["shrunk"],
        "file_smaller": round(1 - sizes["shrunk"] / sizes["dense"], 4),
        "parameters_before": report.parameters_before,
        "parameters_after": report.parameters_after,
        "mlp_groups": len(report.groups),
    }
    print(json.dumps(result, indent=1))
    print(
        f"latency {dense_s:.3f} s -> {small_s:.3f} s: {dense_s / small_s:.2f}x faster (target >= 1.12x); "
        f"file {result['file_smaller']:.1%} smaller (target >= 14%)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
