"""int4 g128 GPTQ variants on SmolLM2-135M (ALPS 2:4 by default): round to nearest, GPTQ one-shot, activation
order, clip search, dampening, and ``--sequential``, each written by ``graphprune quantize`` as a Q/DQ model and
scored on the reference held-out windows.

    python benchmarks/quantize_gptq_variants.py --runs fp32 rtn gptq gptq-act-hclip seq-gptq-act-hclip
    python benchmarks/quantize_gptq_variants.py --table

A run is a name of :data:`RUNS` (``fp32``: the base model itself). One-shot runs read the Gram matrices of
``graphprune calibrate --gram`` on the 64 reference calibration windows (made once, its CPU seconds recorded as
the ``calibrate`` row); ``seq-`` runs calibrate themselves, block by block. CPU seconds are the ``quantize``
child's user + system time. Perplexity is :func:`graphprune.evaluate.perplexity.perplexity` on all 32 reference
windows (what ``graphprune eval --token-windows`` computes), of the written Q/DQ model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from smollm2_quality import CACHE, REFERENCE, perplexity, timed  # noqa: E402

ACT, HCLIP = ["--act-order"], ["--weight-clip", "hessian"]
RUNS: dict[str, list[str]] = {
    "rtn": ["--method", "rtn"],
    "rtn-mse": ["--method", "rtn", "--weight-clip", "mse"],
    "rtn-hclip": ["--method", "rtn", *HCLIP],
    "gptq": ["--method", "gptq"],
    "gptq-act": ["--method", "gptq", *ACT],
    "gptq-hclip": ["--method", "gptq", *HCLIP],
    "gptq-act-mse": ["--method", "gptq", *ACT, "--weight-clip", "mse"],
    "gptq-act-hclip": ["--method", "gptq", *ACT, *HCLIP],
    "gptq-act-hclip-d0.1": ["--method", "gptq", *ACT, *HCLIP, "--percdamp", "0.1"],
    "gptq-act-hclip-d0.001": ["--method", "gptq", *ACT, *HCLIP, "--percdamp", "0.001"],
    "rtn-awq": ["--method", "rtn", "--awq"],
    "rtn-refit": ["--method", "rtn", "--refit-scales"],
    "rtn-awq-hclip-refit": ["--method", "rtn", "--awq", *HCLIP, "--refit-scales"],
    "gptq-act-hclip-refit": ["--method", "gptq", *ACT, *HCLIP, "--refit-scales"],
    "gptq-act-hclip-awq": ["--method", "gptq", *ACT, *HCLIP, "--awq"],
    "gptq-act-hclip-awq-refit": ["--method", "gptq", *ACT, *HCLIP, "--awq", "--refit-scales"],
    "seq-gptq-act-hclip-awq-refit": ["--method", "gptq", "--sequential", *ACT, *HCLIP, "--awq", "--refit-scales"],
    "seq-gptq": ["--method", "gptq", "--sequential"],
    "seq-gptq-act-hclip": ["--method", "gptq", "--sequential", *ACT, *HCLIP],
}
NEEDS_GRAMS = {n for n, a in RUNS.items() if {"gptq", "hessian", "--awq", "--refit-scales"} & set(a)}


def grams(args: argparse.Namespace) -> Path:
    """The base model's Gram matrices on the 64 calibration windows (``graphprune calibrate --gram``), once."""
    path = args.grams or args.workdir / f"{args.base.stem}_grams.npz"
    if not path.exists():
        cli = ["calibrate", str(args.base), "-o", str(path), "--calib", str(args.calib), "--batch-size", "8"]
        seconds, cpu, peak, _ = timed([*cli, "--gram", "-q"], None)
        record(args, {"run": "calibrate", "cpu_seconds": cpu, "seconds": seconds, "peak_mb": peak})
    return path


def one_run(name: str, args: argparse.Namespace) -> dict:
    if name == "fp32":
        return {"run": name, "ppl": perplexity(args.base, args.eval), "cpu_seconds": 0.0}
    out = args.workdir / f"{args.base.stem}_{name}.onnx"
    cli = ["quantize", str(args.base), "--precision", "int4", "--block-size", str(args.block_size)]
    cli += RUNS[name]
    if "--sequential" in RUNS[name]:
        cli += ["--calib", str(args.calib), "--batch-size", "8"]
    sequential_awq = "--sequential" in RUNS[name] and "--awq" in RUNS[name]  # its search reads the base's Grams
    if name in NEEDS_GRAMS and ("--sequential" not in RUNS[name] or sequential_awq):
        cli += ["--stats", str(grams(args))]
    seconds, cpu, peak, _ = timed([*cli, "-o", str(out), "--force", "--json"], None)
    run = name if args.block_size == 128 else f"{name}@g{args.block_size}"  # g128 rows keep their old names
    weights = len(json.loads(out.with_suffix(".report.json").read_text())["weights"])
    result = {"run": run, "ppl": perplexity(out, args.eval), "cpu_seconds": cpu, "seconds": seconds}
    result["int4_weights"] = weights
    out.unlink()  # 150 MB each: only the figures are kept
    return {**result, "peak_mb": peak}


def record(args: argparse.Namespace, result: dict) -> None:
    result = {**result, "base": str(args.base)}
    print(json.dumps(result), flush=True)
    results = json.loads(args.results.read_text()) if args.results.exists() else []
    results = [r for r in results if (r["run"], r.get("base")) != (result["run"], result["base"])] + [result]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=1) + "\n")


def table(results: list[dict], base: str) -> str:
    rows = [r for r in results if r.get("base") == base]
    fp32 = next((r["ppl"] for r in rows if r["run"] == "fp32"), None)
    rtn = {r["run"].partition("@")[2]: r["ppl"] for r in rows if r["run"].partition("@")[0] == "rtn"}
    lines = ["| run | quantize options | perplexity (32 windows) | x FP32 | vs rtn | CPU s |"]
    lines.append("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "ppl" not in r:
            lines.append(f"| {r['run']} | Gram matrices, 64 windows | - | - | - | {r['cpu_seconds']:.0f} |")
            continue
        ratio = f"{r['ppl'] / fp32:.3f}" if fp32 else "-"
        name, _, block = r["run"].partition("@")
        gain = f"{r['ppl'] / rtn[block] - 1:+.1%}" if block in rtn else "-"
        size = [f"--block-size {block[1:]}"] if block else []
        options = " ".join([*RUNS.get(name, ["(the base model)"]), *size])
        lines.append(f"| {r['run']} | `{options}` | {r['ppl']:.2f} | {ratio} | {gain} | {r['cpu_seconds']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=CACHE / "bench" / "smollm2_alps24.onnx")
    parser.add_argument("--calib", type=Path, default=REFERENCE / "smollm2_brown_calib.npz")
    parser.add_argument("--eval", type=Path, default=REFERENCE / "smollm2_brown_eval.npz")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "quantize_gptq_variants.json")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/graphprune-gptq-variants"))
    parser.add_argument("--grams", type=Path, help="saved Gram matrices of the base model (default: made once)")
    parser.add_argument("--runs", nargs="*", default=["fp32", "rtn", "gptq", "gptq-act-hclip"])
    parser.add_argument("--block-size", type=int, default=128, help="int4 block along K (rows NAME@gB)")
    parser.add_argument("--table", action="store_true", help="only print the table of the results so far")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    unknown = [r for r in args.runs if r != "fp32" and r not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; choose fp32 or one of {sorted(RUNS)}")
    if not args.table:
        for name in args.runs:
            record(args, one_run(name, args))
    results = json.loads(args.results.read_text()) if args.results.exists() else []
    print(table(results, str(args.base)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
