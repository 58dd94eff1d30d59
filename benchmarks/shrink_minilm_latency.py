"""all-MiniLM-L6 shrunk by a quarter (MLP neurons and heads) with each of ``--variants`` (default: the uniform and
the ``--allocate error`` recipe; names as benchmarks/shrink_variants.py), calibrated on each of ``--counts`` Brown
paragraphs (default 64 and 256): the models are written once to ``--dir``, then the dense model and
each shrunk one run the 64 x 128 held-out batch in turn (``--repeats`` rounds, one ONNX Runtime thread, so that
CPU seconds count work on a loaded machine): median wall and CPU seconds, each model's speed-up over the dense one
(also the median of the per-round ratios, paired), and its mean cosine.

    nice -n 10 python benchmarks/shrink_minilm_latency.py --repeats 21 \\
        --json benchmarks/results/shrink_all_minilm_l6_refit_latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

try:
    from graphprune import demo
except ImportError:  # run as a script from a checkout without installing graphprune
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from graphprune import demo

from shrink_minilm import feeds  # benchmarks/, beside this script
from shrink_variants import variant

from graphprune.calibration.request import CalibrationRequest
from graphprune.pipeline.shrink import shrink_file


def main() -> None:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("/tmp/graphprune-all-minilm-l6/model.onnx"))
    parser.add_argument("--dir", type=Path, default=Path("/tmp/graphprune-minilm-latency"), help="shrunk models")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--damp", type=float, default=0.1)
    parser.add_argument("--variants", nargs="+", default=["obs+refit", "obs+refit+error"])
    parser.add_argument("--counts", nargs="+", type=int, default=[64, 256], help="calibration paragraphs")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "minilm_latency.json")
    args = parser.parse_args()
    tokenizer = demo.all_minilm_l6() / "tokenizer.json"
    calibration, heldout = demo.brown_split()
    paragraphs = [p for p in calibration.split("\n\n") if len(p) > 80]
    held = feeds(tokenizer, [p for p in heldout.split("\n\n") if len(p) > 80][:64])
    args.dir.mkdir(parents=True, exist_ok=True)
    paths = {"dense": args.model}
    for count in args.counts:
        calib = feeds(tokenizer, paragraphs[:count])
        for name in args.variants:
            path = args.dir / f"{name}_{count}.onnx"
            if not path.exists():  # shrunk once; later runs time the same files
                config = variant(name, 0.25, ("mlp", "heads"), damp=args.damp)
                shrink_file(args.model, config, path, calibration=CalibrationRequest(data=calib, batch_size=16))
            paths[f"{name} ({count})"] = path
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    sessions = {
        k: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for k, p in paths.items()
    }

    def embedding(name: str) -> np.ndarray:
        (e,) = sessions[name].run(["sentence_embedding"], held)
        return e / np.linalg.norm(e, axis=-1, keepdims=True)

    dense = embedding("dense")
    cosine = {k: round(float((dense * embedding(k)).sum(-1).mean()), 4) for k in sessions}
    wall: dict[str, list[float]] = {k: [] for k in sessions}
    cpu: dict[str, list[float]] = {k: [] for k in sessions}
    load = [os.getloadavg()[0]]
    for _ in range(args.repeats):  # every model in turn: they all see the same load
        for name, session in sessions.items():
            t, c = time.perf_counter(), time.process_time()
            session.run(["sentence_embedding"], held)
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    load.append(os.getloadavg()[0])
    w0, c0 = statistics.median(wall["dense"]), statistics.median(cpu["dense"])
    rows = {
        k: {
            "mean_cosine": cosine[k],
            "median_s": round(statistics.median(wall[k]), 3),
            "median_cpu_s": round(statistics.median(cpu[k]), 3),
            "speedup_wall": round(w0 / statistics.median(wall[k]), 3),
            "speedup_cpu": round(c0 / statistics.median(cpu[k]), 3),
            # each round's dense CPU seconds over this model's in the same round: a load that drifts between
            # rounds cancels in the ratio
            "speedup_cpu_paired": round(
                statistics.median([d / m for d, m in zip(cpu["dense"], cpu[k], strict=True)]), 3
            ),
        }
        for k in sessions
    }
    result = {"repeats": args.repeats, "threads": 1, "load": [round(x, 2) for x in load], "rows": rows}
    print(json.dumps(result, indent=1))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
