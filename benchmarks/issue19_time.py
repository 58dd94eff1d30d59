"""Issue 19's time targets, measured in one process: each run a ``graphprune`` child, in interleaved rounds.

Sections (``--sections``), each a set of runs compared with its first:

* ``minilm``: all-MiniLM-L6, 25% of MLP neurons and heads, ``shrink --calib`` (flap scores, damping 0.1, global
  allocation), on the 64 Brown calibration paragraphs padded to 128 tokens (``shrink_minilm.py``'s): without the
  refit, with it (the default), ``--sequential`` with and without it;
* ``shrink``: SmolLM2-135M, 25% of MLP neurons, the same options on the first ``--windows`` reference calibration
  windows: without the refit, with it, ``--sequential``, and the recipe that meets the issue's ≤ 48 (obs walk,
  allocation by flap, ``--sequential --target dense --target-blend 0.25 --refit-scope all --refit-damp 0.003``);
* ``alps``: SmolLM2-135M 2:4, ALPS ``--sequential`` on the same windows, plain and with
  ``--target dense --target-blend 0.25 --swaps 16 --percdamp 0.15`` (the damping two genre-held-out splits
  choose; BENCHMARKS.md).

Every run is a child process (``python -m graphprune ...``, through ``--heavy`` for SmolLM2); its CPU seconds are
its user + system time with its descendants' (``os.wait4``), never wall time. Rounds alternate the order of the
runs (ABBA), so drift in the machine's load falls on both sides. The children import the committed code: ``HEAD``
archived once at the start (``--snapshot``), so edits to the tree during a long run do not mix into it. Results are
merged into ``--json`` by section after every child; the load average is recorded around each child.

    python benchmarks/issue19_time.py --sections alps --rounds 1 --windows 16 --heavy /work/wt/heavy
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = Path.home() / ".cache" / "graphprune"
REFERENCE = Path("/work/shared/reference")
SMOLLM2 = CACHE / "smollm2" / "model.onnx"
MINILM = Path("/tmp/graphprune-all-minilm-l6/model.onnx")

FLAP = ["--method", "flap", "--refit-damp", "0.1"]
MINI = ["shrink", "--ratio", "0.25", "--units", "mlp,heads", *FLAP]
SMOL = ["shrink", "--ratio", "0.25", "--units", "mlp", "--method", "flap"]
ALPS = ["apply", "--nm", "2:4", "--method", "alps", "--batch-size", "8", "--sequential"]
SECTIONS: dict[str, dict[str, list[str]]] = {
    "minilm": {
        "flap": [*MINI, "--no-refit"],
        "flap+refit": MINI,
        "flap+refit --sequential": [*MINI, "--sequential"],
        "flap --sequential": [*MINI, "--no-refit", "--sequential"],
    },
    "shrink": {
        "flap+refit": SMOL,
        "flap": [*SMOL, "--no-refit"],
        "flap+refit --sequential": [*SMOL, "--sequential"],
        "obs+refit --sequential --target dense --refit-scope all (the <= 48 recipe)": [
            *["shrink", "--ratio", "0.25", "--units", "mlp", "--method", "obs", "--allocate-by", "flap"],
            *["--sequential", "--target", "dense", "--target-blend", "0.25", "--refit-scope", "all"],
            *["--refit-damp", "0.003"],
        ],
    },
    "alps": {
        "alps": ALPS,
        "alps dense@0.25 swaps16 damp0.15": [
            *ALPS,
            *["--target", "dense", "--target-blend", "0.25", "--swaps", "16", "--percdamp", "0.15"],
        ],
    },
}


def snapshot(into: Path) -> Path:
    """``HEAD`` of this checkout, archived under ``into``: the code every child imports."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True)
    archive = subprocess.Popen([*git, "archive", "HEAD"], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(into)], stdin=archive.stdout, check=True)
    archive.wait()
    (into / "COMMIT").write_text(head.stdout)
    return into


def minilm_data(out: Path) -> Path:
    """The 64 Brown calibration paragraphs padded to 128 tokens, as ``shrink_minilm.py`` calibrates."""
    sys.path.insert(0, str(HERE))
    from shrink_minilm import feeds

    from graphprune import demo

    calibration, _ = demo.brown_split()
    paragraphs = [p for p in calibration.split("\n\n") if len(p) > 80][:64]
    np.savez(out, **feeds(demo.all_minilm_l6() / "tokenizer.json", paragraphs))
    return out


def smollm2_data(out: Path, windows: int) -> Path:
    data = np.load(REFERENCE / "smollm2_brown_calib.npz")
    np.savez(out, **{k: data[k][:windows] for k in data.files})
    return out


def child(command: list[str], env: dict[str, str], heavy: str | None) -> tuple[float, float]:
    """Run ``python -m graphprune COMMAND``; its CPU seconds (user + system, descendants included) and wall."""
    argv = [sys.executable, "-m", "graphprune", *command]
    start = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen([heavy, *argv] if heavy else argv, stdout=log, stderr=log, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        if os.waitstatus_to_exitcode(status):
            log.seek(0)
            raise SystemExit(f"graphprune {' '.join(command)} failed:\n{log.read().decode()[-3000:]}")
    return usage.ru_utime + usage.ru_stime, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--windows", type=int, default=16, help="SmolLM2 calibration windows (reference: 64)")
    parser.add_argument("--heavy", default=None, help="a wrapper every SmolLM2 child runs through")
    parser.add_argument("--threads", type=int, default=None, help="threads of each child (default: its own)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/graphprune-issue19-time"))
    parser.add_argument("--json", type=Path, default=HERE / "results" / "issue19_time.json")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    code = snapshot(Path(tempfile.mkdtemp(prefix="code-", dir=args.workdir)))
    env = {**os.environ, "PYTHONPATH": str(code)}  # before the editable install's finder
    if args.threads:  # CPU seconds then count work, not threads spinning while they wait for a core
        env.update(
            {k: str(args.threads) for k in ("GRAPHPRUNE_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
        )
    inputs = {
        "minilm": (MINILM, minilm_data(args.workdir / "minilm_calib.npz")) if "minilm" in args.sections else None,
        "smollm2": (SMOLLM2, smollm2_data(args.workdir / f"smollm2_{args.windows}.npz", args.windows)),
    }
    for section in args.sections:
        model, data = inputs["minilm" if section == "minilm" else "smollm2"]  # type: ignore[misc]
        heavy = None if section == "minilm" else args.heavy
        runs = SECTIONS[section]
        cpu: dict[str, list[float]] = {name: [] for name in runs}
        loads: list[float] = []
        for r in range(args.rounds):
            for name in list(runs)[:: -1 if r % 2 else 1]:
                out = args.workdir / f"{section}_{len(cpu[name])}.onnx"
                command = [runs[name][0], str(model), *runs[name][1:], "--calib", str(data), "-o", str(out)]
                loads.append(os.getloadavg()[0])
                seconds, wall = child([*command, "--force"], env, heavy)
                loads.append(os.getloadavg()[0])
                cpu[name].append(round(seconds, 1))
                print(json.dumps({"section": section, "run": name, "cpu_s": cpu[name][-1], "wall_s": round(wall)}),
                      flush=True)  # fmt: skip
                base = statistics.median(cpu[next(iter(runs))]) if cpu[next(iter(runs))] else None
                row = {
                    "model": str(model),
                    "calibration": str(data) if section == "minilm" else f"{args.windows} reference windows",
                    "commit": (code / "COMMIT").read_text().strip(),
                    "cpu_s": cpu,
                    "median_over_first": {
                        n: round(statistics.median(v) / base, 3) for n, v in cpu.items() if v and base
                    },
                    "load_average": [round(min(loads), 1), round(max(loads), 1)],
                    "rounds": args.rounds,
                    "threads": args.threads or "default",
                }
                latest = json.loads(args.json.read_text()) if args.json.exists() else {}
                latest[section] = row
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(latest, indent=1) + "\n")


if __name__ == "__main__":
    main()
