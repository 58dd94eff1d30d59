"""Cost of one-shot and sequential calibration on SmolLM2-135M, as ratios to one plain ONNX Runtime pass.

In one run, each case in its own child process (times include the model load; peak RSS per child):
  plain       one ONNX Runtime pass over the calibration windows (calibration_memory.py's child)
  calib       one-shot calibration: the tapped model, one pass (calibration_memory.py's child)
  sequential  ``--sequential`` Wanda 2:4: calibrate and prune block by block (no model written)
  by-level    the same, level by level

    python benchmarks/sequential_cost.py [--model M] [--data calib.npz] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODEL = Path.home() / ".cache" / "graphprune" / "smollm2" / "model.onnx"
DATA = ROOT.parent / "shared" / "reference" / "smollm2_brown_calib.npz"


def sequential_child(model: Path, data: Path, batch: int, sequential: str) -> dict:
    sys.path.insert(0, str(ROOT))
    from graphprune.algorithms.pattern import NMPattern
    from graphprune.algorithms.scores import Method
    from graphprune.calibration.request import CalibrationRequest
    from graphprune.graph.model_io import load_model
    from graphprune.passes.prune import PruneConfig
    from graphprune.pipeline.progress import PruneProgress
    from graphprune.pipeline.sequential import prune_sequentially

    start = time.perf_counter()
    loaded = load_model(model)
    batches, _ = CalibrationRequest(str(data), batch_size=batch).batches(loaded)
    groups: list[int] = []
    config = PruneConfig(NMPattern(2, 4), method=Method.WANDA)

    class Groups(PruneProgress):
        def group_done(self, done: int, total: int) -> None:
            groups.append(total)

    prune_sequentially(loaded, config, batches, sequential=sequential, progress=Groups())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": time.perf_counter() - start, "peak_mib": peak, "groups": groups[-1]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--child", choices=["block", "level"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(sequential_child(a.model, a.data, a.batch_size, a.child)))
        return
    common = ["--model", str(a.model), "--data", str(a.data), "--batch-size", str(a.batch_size)]
    cases = {
        "plain": [str(HERE / "calibration_memory.py"), "--child", "plain"],
        "calib": [str(HERE / "calibration_memory.py"), "--child", "calib"],
        "sequential": [__file__, "--child", "block"],
        "by-level": [__file__, "--child", "level"],
    }
    results = {}
    for name, args in cases.items():
        out = subprocess.run([sys.executable, *args, *common], check=True, capture_output=True, text=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
        r = results[name]
        extra = f", {r['groups']} groups" if "groups" in r else ""
        print(f"{name:10s} {r['seconds']:7.1f} s  peak RSS {r['peak_mib']:6.0f} MiB{extra}")
    plain = results["plain"]
    for name in ("calib", "sequential", "by-level"):
        r = results[name]
        print(
            f"{name}: {r['seconds'] / plain['seconds']:.2f}x the plain pass's time, "
            f"{r['peak_mib'] / plain['peak_mib']:.2f}x its peak memory"
        )


if __name__ == "__main__":
    main()
