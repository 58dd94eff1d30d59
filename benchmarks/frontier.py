"""SmolLM2-135M: Brown perplexity against ONNX Runtime CPU speed-up, for pruning, quantization and both.

Every variant is built with graphprune's own commands (as a user would run them) from the FP32 model:

- bases: ``dense``; ``2:4`` (ALPS from ``~/.cache/graphprune/bench/smollm2_alps24.onnx`` when that file exists,
  else one-shot Wanda); ``shrinkNN`` (``shrink --units mlp --ratio 0.NN``: flap scores, global allocation, refit);
- on each base: nothing (FP32), ``int8`` (W8A8, static activation scales, ``--target ort``, SmoothQuant 0.8) or
  ``int4`` (weight-only, g128, round to nearest).

Calibration (2:4, shrink, int8 scales) uses the first ``--calib-windows`` of the reference's 512-token calibration
windows. Quality: perplexity on the first ``--windows`` Brown held-out reference windows (8 by default: the full
protocol has 32). Speed: the variant and the dense FP32 model, one ONNX Runtime CPU session each (all graph
optimisations), timed in ``--rounds`` interleaved rounds in one process on the first held-out window (512 tokens),
medians (graphprune/evaluate/timing.py). The plot's speed-up is the ratio of the median CPU seconds per run (on the
shared, loaded machine the wall time mostly measures the other jobs; run with ``GRAPHPRUNE_THREADS=1`` so that
CPU seconds are the work of one core); the JSON has the wall-time ratio too. Every figure goes to the JSON as soon
as it exists, so a killed run resumes where it stopped; built models stay in ``--work``.

    nice -n 5 python benchmarks/frontier.py                 # build, measure what is missing, then plot
    python benchmarks/frontier.py --plot-only               # redraw the PNG from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
# The reference windows sit beside the checkout (../shared) or beside the worktrees' folder (../../shared).
REFERENCE = next((p / "shared" / "reference" for p in HERE.parents[1:3] if (p / "shared").is_dir()), Path("."))
CACHE = Path(os.environ.get("GRAPHPRUNE_CACHE", Path.home() / ".cache" / "graphprune"))
ALPS24 = CACHE / "bench" / "smollm2_alps24.onnx"
VARIANTS = [
    "dense", "int8", "2:4", "2:4+int8", "shrink25", "shrink25+int8", "int4", "2:4+int4",
    "shrink10", "shrink10+int8", "shrink40", "shrink40+int8",
]  # fmt: skip
# int8 with ONNX Runtime's CPU preset (uint8 activations: its x86 U8S8 kernels; the tensorrt preset's int8
# activations ran no faster than FP32 here) and SmoothQuant 0.8 (the best alpha measured on this model so far).
QUANTIZE = {
    "int8": ["--precision", "int8", "--target", "ort", "--smooth", "0.8"],
    "int4": ["--precision", "int4", "--block-size", "128"],
}


def graphprune(*args: str) -> float:
    """Run one graphprune command (in a child process, so its memory is given back); its CPU seconds."""
    before = os.times()
    command = [str(Path(sys.executable).with_name("graphprune")), *args]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    after = os.times()
    return round(after.children_user + after.children_system - before.children_user - before.children_system, 1)


class Builder:
    """The variants' model files in ``work``, each built once (from its base, built first)."""

    def __init__(self, model: Path, work: Path, calib: Path) -> None:
        self.model, self.work, self.calib = model, work, calib
        self.cpu: dict[str, float] = {}

    def path(self, variant: str) -> Path:
        if variant == "dense":
            return self.model
        if variant == "2:4" and ALPS24.is_file():
            return ALPS24
        return self.work / f"{variant.replace(':', '').replace('+', '.')}.onnx"

    def base_method(self, variant: str) -> str:
        base = variant.split("+")[0]
        if base == "2:4":
            return "alps --sequential" if ALPS24.is_file() else "wanda one-shot"
        if base.startswith("shrink"):
            return "shrink mlp flap, global allocation, refit"
        return "dense"

    def build(self, variant: str) -> Path:
        out = self.path(variant)
        if out.is_file():
            return out
        base, _, quant = variant.partition("+")
        if quant or base in QUANTIZE:
            source = self.build(base if quant else "dense")
            precision = quant or base
            args = [str(source), *QUANTIZE[precision], "-o", str(out), "--force"]
            if precision == "int8":
                args += ["--calib", str(self.calib)]
            self.cpu[variant] = graphprune("quantize", *args)
        elif base == "2:4":
            args = ["--nm", "2:4", "--method", "wanda", "--calib", str(self.calib), "-o", str(out), "--force"]
            self.cpu[variant] = graphprune("apply", str(self.model), *args)
        elif base.startswith("shrink"):
            ratio = f"0.{base.removeprefix('shrink')}"
            args = ["--units", "mlp", "--ratio", ratio, "--calib", str(self.calib), "-o", str(out), "--force"]
            self.cpu[variant] = graphprune("shrink", str(self.model), *args)
        else:
            raise SystemExit(f"unknown variant {variant}")
        return out


def first_windows(source: Path, count: int, out: Path) -> Path:
    """The first ``count`` windows of a reference .npz, for calibration runs that use every window they get."""
    if not out.is_file():
        with np.load(source) as data:
            np.savez(out, **{k: data[k][:count] for k in data.files})
    return out


def measure(args: argparse.Namespace, results: dict) -> None:
    from graphprune.evaluate.perplexity import perplexity
    from graphprune.evaluate.timing import compare_models

    args.work.mkdir(parents=True, exist_ok=True)
    calib = first_windows(args.calib, args.calib_windows, args.work / f"calib{args.calib_windows}.npz")
    builder = Builder(args.model, args.work, calib)
    with np.load(args.eval) as data:
        windows = data["input_ids"][: args.windows]
    context = windows[:1, :-1]
    feed = {"input_ids": context, "attention_mask": np.ones_like(context)}
    for variant in args.variants:
        row = results["variants"].setdefault(variant, {})
        if "ppl" in row and ("speedup" in row or variant == "dense"):
            continue
        start = time.time()
        path = builder.build(variant)
        row.update(model=str(path), base=builder.base_method(variant), build_cpu_s=builder.cpu.get(variant))
        if "ppl" not in row:
            row["ppl"] = round(perplexity(path, windows), 3)
            save(args.results, results)
        if variant == "dense":
            row.update(speedup=1.0, cpu_speedup=1.0)
        elif "speedup" not in row:
            timed = compare_models([args.model, path], feed, rounds=args.rounds)
            row.update(
                speedup=round(timed.speedup(1), 3),
                cpu_speedup=round(timed.cpu_speedup(1), 3),
                dense_wall_s=round(timed.timings[0].wall_s, 4),
                wall_s=round(timed.timings[1].wall_s, 4),
            )
        row["wall_s_spent"] = round(time.time() - start, 1)
        save(args.results, results)
        print(json.dumps({variant: row}), flush=True)


def save(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(results, indent=1) + "\n")
    temporary.replace(path)


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"fp32": "tab:blue", "int8": "tab:orange", "int4": "tab:green"}
    markers = {"dense": "o", "2:4": "s", "shrink": "^"}
    from matplotlib.ticker import ScalarFormatter

    fig, ax = plt.subplots(figsize=(8.5, 5))
    rows = {k: v for k, v in results["variants"].items() if "ppl" in v and "cpu_speedup" in v}
    for name, row in rows.items():
        base, _, quant = name.partition("+")
        if base in QUANTIZE:
            base, quant = "dense", base
        shape = markers["shrink" if base.startswith("shrink") else base]
        point = (row["cpu_speedup"], row["ppl"])
        ax.scatter(*point, c=colours[quant or "fp32"], marker=shape, s=60, zorder=3)
        label = f"{name} ({row['ppl']:.1f}, {row['cpu_speedup']:.2f}x)"
        ax.annotate(label, point, textcoords="offset points", xytext=(6, 4), fontsize=8)
    for quant, colour in colours.items():
        ax.scatter([], [], c=colour, marker="o", label=quant)
    for base, shape in markers.items():
        ax.scatter([], [], c="grey", marker=shape, label=base)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    threads = results["protocol"]["threads"]
    ax.set_xlabel(
        f"ONNX Runtime CPU speed-up over dense FP32: median CPU s per 1x512-token run, {threads} thread(s), "
        "interleaved rounds",
        fontsize=9,
    )
    ax.set_ylabel(f"Brown held-out perplexity ({results['protocol']['eval_windows']} windows, lower is better)")
    missing = [v for v in results["protocol"]["variants"] if v not in rows]
    title = "SmolLM2-135M: quality against speed on a 2-core CPU (lower right is better)"
    if missing:
        title += "\n" + textwrap.fill(f"(partial: not measured yet: {', '.join(missing)})", 100)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.margins(x=0.3, y=0.1)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def table(results: dict) -> str:
    """The measured variants as a markdown table (for the README)."""
    dense = results["variants"]["dense"]["ppl"]
    lines = [
        "| variant | perplexity | x dense | CPU speed-up | wall speed-up |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, row in results["variants"].items():
        if "ppl" in row and "cpu_speedup" in row:
            ratios = f"{row['ppl'] / dense:.2f} | {row['cpu_speedup']:.2f}x | {row['speedup']:.2f}x"
            lines.append(f"| {name} | {row['ppl']:.2f} | {ratios} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=CACHE / "smollm2" / "model.onnx")
    parser.add_argument("--variants", nargs="*", default=VARIANTS)
    parser.add_argument("--calib", type=Path, default=REFERENCE / "smollm2_brown_calib.npz")
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--eval", type=Path, default=REFERENCE / "smollm2_brown_eval.npz")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", type=Path, default=CACHE / "bench" / "frontier")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "frontier.json")
    parser.add_argument("--png", type=Path, default=HERE / "results" / "frontier.png")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--table", action="store_true", help="print the markdown table of --results and stop")
    args = parser.parse_args()
    results = json.loads(args.results.read_text()) if args.results.is_file() else {"variants": {}}
    if args.table:
        print(table(results))
        return
    if not args.plot_only:
        results["protocol"] = {
            "model": str(args.model),
            "variants": args.variants,
            "calib_windows": args.calib_windows,
            "eval_windows": args.windows,
            "timing": f"dense FP32 and the variant interleaved, {args.rounds} rounds, median wall; 1x512 tokens",
            "threads": os.environ.get("GRAPHPRUNE_THREADS", "ONNX Runtime default"),
            "cpus": os.cpu_count(),
            "quantize": QUANTIZE,
        }
        measure(args, results)
    plot(results, args.png)


if __name__ == "__main__":
    main()
