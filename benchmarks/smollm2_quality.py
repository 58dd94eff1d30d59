"""SmolLM2-135M on the reference protocol: graphprune's pruned models' Brown held-out perplexity and prune time.

Calibration and evaluation use the reference's exact windows (``../shared/reference/``): 64 x 512 calibration
tokens, 32 x 513 held-out tokens with BOS. Each prune runs as ``graphprune apply`` in a child process (its wall
time and peak RSS are measured there, calibration included), each evaluation as ``graphprune eval``.

    python benchmarks/export_smollm2.py                         # once: the ONNX export (needs the torch extra)
    python benchmarks/smollm2_quality.py --runs wanda:2:4:sequential sparsegpt:0.5:sequential
    python benchmarks/smollm2_quality.py --table                # the markdown table of every result so far

A run is METHOD:PATTERN:MODE[:permute] with PATTERN an N:M pattern or an unstructured sparsity, MODE one-shot,
sequential (block by block, as the reference) or by-level (magnitude needs no calibration: its mode is
ignored); ``permute`` adds ``apply --permute`` (N:M only). Results are appended to ``--results``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# ../shared/reference beside the checkout; a git worktree sits deeper (wt/NAME), so look up the parents.
REFERENCE = next(
    (p / "shared" / "reference" for p in HERE.parents if (p / "shared" / "reference").is_dir()),
    HERE.parent.parent / "shared" / "reference",
)
CACHE = Path(os.environ.get("GRAPHPRUNE_CACHE", Path.home() / ".cache" / "graphprune"))
DEFAULT_RUNS = [
    "dense",
    "magnitude:0.5",
    "magnitude:4:8",
    "magnitude:2:4",
    "wanda:0.5:sequential",
    "wanda:4:8:sequential",
    "wanda:2:4:sequential",
    "wanda:0.5:one-shot",
    "wanda:2:4:one-shot",
    "sparsegpt:0.5:sequential",
    "sparsegpt:2:4:sequential",
]


def parse_run(text: str) -> dict:
    parts = text.split(":")
    if parts == ["dense"]:
        return {"method": "dense", "pattern": "dense", "mode": "-", "permute": False}
    permute = parts[-1] == "permute"
    if permute:
        parts.pop()
    method, rest = parts[0], parts[1:]
    mode = rest.pop() if rest and rest[-1] in ("one-shot", "sequential", "by-level") else "one-shot"
    if method == "magnitude":
        mode = "-"
    pattern = ":".join(rest)
    return {"method": method, "pattern": pattern, "mode": mode, "permute": permute}


def run_key(run: dict) -> tuple:
    return (run["method"], run["pattern"], run["mode"], bool(run.get("permute")))


def apply_args(run: dict, model: Path, calib: Path, out: Path) -> list[str]:
    pattern = ["--nm", run["pattern"]] if ":" in run["pattern"] else ["--sparsity", run["pattern"]]
    args = ["apply", str(model), *pattern, "--method", run["method"], "-o", str(out), "--force"]
    if run["method"] == "magnitude":
        args += ["--scope", "layer"]  # as the reference's prune_magnitude: one threshold per layer
    else:
        args += ["--calib", str(calib), "--batch-size", "8"]
    if run["mode"] in ("sequential", "by-level"):
        args.append("--sequential")
    if run["mode"] == "by-level":
        args.append("--by-level")
    if run.get("permute"):
        args.append("--permute")
    return args


def timed(args: list[str], threads: int | None) -> tuple[float, float, float, str]:
    """Run ``graphprune ARGS`` in a child; wall seconds, CPU seconds, the child's peak RSS in MB, its output.

    CPU seconds (user + system, all threads) compare runs fairly on a shared machine, where wall time
    depends on what else runs."""
    env = dict(os.environ)
    if threads:
        env.update(
            OMP_NUM_THREADS=str(threads), GRAPHPRUNE_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads)
        )
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        child = subprocess.Popen([sys.executable, "-m", "graphprune", *args], stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak RSS, not the maximum of all children
        child.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if child.returncode:
        raise SystemExit(f"graphprune {' '.join(args)} failed:\n{stdout}\n{stderr}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, stdout


def perplexity(model: Path, eval_windows: Path) -> float:
    """Brown held-out perplexity: the same computation as ``graphprune eval --token-windows``."""
    import numpy as np

    from graphprune.evaluate.perplexity import perplexity as model_perplexity

    with np.load(eval_windows) as data:
        return model_perplexity(model, data["input_ids"])


def reference_key(method: str, pattern: str) -> tuple[str, str, float]:
    """The reference's (method, pattern, sparsity) for one of our runs."""
    if method == "dense":
        return ("dense", "dense", 0.0)
    if ":" in pattern:
        keep, group = (int(x) for x in pattern.split(":"))
        return (method, pattern, round(1 - keep / group, 6))
    return (method, "unstructured", round(float(pattern), 6))


def table(results: list[dict], reference: list[dict]) -> str:
    ref = {(r["method"], r["pattern"], round(r["sparsity"], 6)): r["brown_heldout_ppl"] for r in reference}
    lines = [
        "| method | pattern | calibration | permute | graphprune ppl | reference ppl | ratio | prune s | CPU s "
        "| peak MB |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    methods = ["dense", "magnitude", "wanda", "sparsegpt", "alps"]
    modes = ["-", "sequential", "by-level", "one-shot"]
    ordered = sorted(
        results,
        key=lambda r: (methods.index(r["method"]), r["pattern"], modes.index(r["mode"]), bool(r.get("permute"))),
    )
    for r in ordered:
        theirs = ref.get(reference_key(r["method"], r["pattern"]))
        ratio = f"{r['ppl'] / theirs:.3f}" if theirs else "-"
        permute = "yes" if r.get("permute") else "-"
        cpu = f"{r['cpu_seconds']:.0f}" if r.get("cpu_seconds") else "-"
        lines.append(
            f"| {r['method']} | {r['pattern']} | {r['mode']} | {permute} | {r['ppl']:.2f} | {theirs or '-'} | "
            f"{ratio} | {r['seconds']:.0f} | {cpu} | {r['peak_mb']:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=CACHE / "smollm2" / "model.onnx")
    parser.add_argument("--calib", type=Path, default=REFERENCE / "smollm2_brown_calib.npz")
    parser.add_argument("--eval", type=Path, default=REFERENCE / "smollm2_brown_eval.npz")
    parser.add_argument("--reference", type=Path, default=REFERENCE / "smollm2_brown_reference.json")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "smollm2_quality.json")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/graphprune-smollm2"))
    parser.add_argument("--runs", nargs="*", default=DEFAULT_RUNS, help="METHOD:PATTERN[:MODE] ... or dense")
    parser.add_argument("--threads", type=int, default=None, help="limit every child to this many threads")
    parser.add_argument("--table", action="store_true", help="only print the table of the results so far")
    args = parser.parse_args()

    reference = json.loads(args.reference.read_text())["results"]
    results = json.loads(args.results.read_text()) if args.results.exists() else []
    if not args.table:
        if not args.model.exists():
            raise SystemExit(f"{args.model} is missing: run benchmarks/export_smollm2.py first")
        args.workdir.mkdir(parents=True, exist_ok=True)
        for text in args.runs:
            run = parse_run(text)
            if run["method"] == "dense":
                seconds, cpu, peak, pruned = 0.0, 0.0, 0.0, args.model
            else:
                pruned = args.workdir / f"{text.replace(':', '_')}.onnx"
                seconds, cpu, peak, _ = timed(apply_args(run, args.model, args.calib, pruned), args.threads)
            run.update(
                ppl=perplexity(pruned, args.eval),
                seconds=seconds,
                cpu_seconds=cpu,
                peak_mb=peak,
                threads=args.threads,
            )
            print(json.dumps(run), flush=True)
            results = [r for r in results if run_key(r) != run_key(run)]
            results.append(run)
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results, reference))
    return 0


if __name__ == "__main__":
    sys.exit(main())
