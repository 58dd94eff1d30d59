"""SmolLM2-135M quantized: Brown held-out perplexity of graphprune's Q/DQ variants beside ONNX Runtime's.

Reference protocol (``../shared/reference/``): calibration on the 64 x 512-token windows, perplexity on the first
``--windows`` held-out windows (8 by default: FP32 31.41 there). graphprune's activation ranges are collected once
(in the graph, running min/max per channel) and serve every static variant (smoothing rescales them exactly);
each variant is then quantized from a fresh copy of the model, written to a temporary file and evaluated.
ONNX Runtime's ``quantize_static`` (QDQ, per-channel symmetric int8 weights, uint8 MinMax activations) calibrates
on the first ``--ort-calib`` windows (its calibrator keeps every intermediate tensor of every window in memory);
``quantize_dynamic`` needs none.

    python benchmarks/quantize_quality.py --model ~/.cache/graphprune/smollm2/model.onnx \\
        --runs fp32 int8 int8:smooth=0.5 fp8 ort-static ort-dynamic
    python benchmarks/quantize_quality.py --table --results benchmarks/results/quantize_quality.jsonl

A run is ``fp32``, ``ort-static``, ``ort-dynamic`` or ``PRECISION[:key=value...]`` with keys ``smooth``,
``target``, ``method``, ``block``, ``dynamic``, ``head``, ``clip``, ``percentile``, ``float_above``
(QuantizeConfig's fields; ``head``: include the head), ``bmm=on|off`` (attention's activation x activation
MatMuls quantized or not). A ``clip`` other than minmax runs its own in-graph calibration per variant.
``--target ort`` variants get the exact rewrites that ``quantize_file`` makes for that target. ``--keep DIR``
keeps the quantized models.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from smollm2_quality import CACHE, REFERENCE  # noqa: E402


def config_of(run: str):  # type: ignore[no-untyped-def]
    from graphprune.quantize.config import QuantizeConfig

    precision, *options = run.split(":")
    fields: dict[str, object] = {"precision": precision}
    for option in options:
        key, _, value = option.partition("=")
        if key in ("smooth", "float_above", "percentile"):
            fields[key] = float(value)
        elif key == "block":
            fields["block_size"] = int(value)
        elif key in ("dynamic", "head"):
            fields["include_head" if key == "head" else key] = True
        elif key == "bmm":
            fields["bmm"] = value == "on"
        else:
            fields[key] = value
    return QuantizeConfig(**fields)  # type: ignore[arg-type]


def cached_ranges(cache: Path | None, compute):  # type: ignore[no-untyped-def]
    """Per-channel activation ranges from ``cache`` (an .npz this script wrote), else computed and saved there."""
    from graphprune.quantize.ranges import ChannelRange

    if cache is not None and cache.exists():
        with np.load(cache) as f:
            names = [str(n) for n in f["names"]]
            return {n: ChannelRange(f[f"lo_{i}"], f[f"hi_{i}"], int(f[f"rows_{i}"])) for i, n in enumerate(names)}
    ranges = compute()
    if cache is not None:
        arrays: dict[str, np.ndarray] = {"names": np.array(list(ranges))}
        for i, r in enumerate(ranges.values()):
            arrays.update({f"lo_{i}": r.lo, f"hi_{i}": r.hi, f"rows_{i}": np.array(r.rows)})
        np.savez(cache, **arrays)
    return ranges


def first_windows(calib: Path, windows: int | None):  # type: ignore[no-untyped-def]
    """A calibration request on the first ``windows`` windows of ``calib`` (all of them: None)."""
    from graphprune.calibration.request import CalibrationRequest

    if windows is None:
        return CalibrationRequest(data=str(calib))
    with np.load(calib) as data:
        return CalibrationRequest(data={k: data[k][:windows] for k in data.files}, batch_size=1)


def ours(
    model_path: Path,
    runs: list[str],
    calib: Path,
    out_dir: Path,
    cache: Path | None = None,
    clip_windows: int | None = None,
    gram_windows: int | None = None,
) -> dict[str, tuple[Path, float]]:
    """graphprune's variants: one range calibration (and one Gram calibration for gptq), then each variant (a
    clip other than minmax runs its own pass on the smoothed model, on the first ``clip_windows`` windows)."""
    from graphprune.graph.model_io import load_model
    from graphprune.quantize.files import Measured, measure, quantize_model
    from graphprune.quantize.gptq_weights import gram_statistics
    from graphprune.quantize.opset import require_opset
    from graphprune.quantize.ort_rewrites import rewrite_for_ort
    from graphprune.quantize.select import plan_quantization
    from graphprune.quantize.untie import untie_head_tables

    request = first_windows(calib, None)
    configs = {run: config_of(run) for run in runs}
    base = load_model(model_path)
    widest = next((c for c in configs.values() if c.include_head), next(iter(configs.values())))
    widest = dataclasses.replace(widest, bmm=True)  # the attention MatMuls' operands are measured too
    if widest.include_head:
        untie_head_tables(base)  # the head's input is measured too
    plan = plan_quantization(base, widest)
    start = time.process_time()
    measured = Measured()
    if any(c.needs_ranges for c in configs.values()):
        ranges_config = next(c for c in configs.values() if c.needs_ranges)
        measured.ranges = cached_ranges(
            cache, lambda: measure(base, model_path, plan, ranges_config, request).ranges
        )
    if any(c.method == "gptq" for c in configs.values()):
        # the Grams alone: measure() would calibrate the ranges again
        measured.grams = gram_statistics(model_path, plan.targets, None, first_windows(calib, gram_windows))
    calibration_cpu = time.process_time() - start
    print(f"calibration: {calibration_cpu:.0f} CPU s", flush=True)
    written = {}
    for run, config in configs.items():
        start = time.process_time()
        model = load_model(model_path)
        if config.include_head:
            untie_head_tables(model)
        if config.target == "ort":
            rewrite_for_ort(model)
        require_opset(model, config.opset, run)
        clip_request = first_windows(calib, clip_windows)
        planned = plan_quantization(model, config)
        report = quantize_model(model, config, planned, measured, calibration=clip_request)
        if config.clip != "minmax":  # which clips were chosen: fraction of max|x| -> how many activations
            chosen = Counter(round(a.clip, 3) for a in report.result.activations)
            print(json.dumps({"run": run, "clip_fractions": dict(sorted(chosen.items()))}), flush=True)
        path = out_dir / f"{run.replace(':', '_').replace('=', '')}.onnx"
        import onnx_ir as ir

        ir.save(model, path)
        written[run] = (path, time.process_time() - start)
    return written


def ort_static(model_path: Path, calib: Path, windows: int, out: Path) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    with np.load(calib) as data:
        ids, mask = data["input_ids"][:windows], data["attention_mask"][:windows]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rows = iter(range(windows))

        def get_next(self) -> dict | None:
            i = next(self.rows, None)
            return None if i is None else {"input_ids": ids[i : i + 1], "attention_mask": mask[i : i + 1]}

    quantize_static(
        model_path,
        out,
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return out


def ort_dynamic(model_path: Path, out: Path) -> Path:
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(model_path, out)
    return out


def perplexity(model: Path, eval_windows: Path, windows: int) -> float:
    from graphprune.evaluate.perplexity import perplexity as model_perplexity

    with np.load(eval_windows) as data:
        return model_perplexity(model, data["input_ids"][:windows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=CACHE / "smollm2" / "model.onnx")
    parser.add_argument("--label", default="dense", help="what the model is (dense, alps 2:4 ...), for the table")
    default_runs = ["fp32", "int8", "int8:smooth=0.5", "ort-static", "ort-dynamic"]
    parser.add_argument("--runs", nargs="*", default=default_runs)
    parser.add_argument("--calib", type=Path, default=REFERENCE / "smollm2_brown_calib.npz")
    parser.add_argument("--eval", type=Path, default=REFERENCE / "smollm2_brown_eval.npz")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--ranges-cache", type=Path, help="reuse (or save) this model's activation ranges here")
    parser.add_argument("--ort-calib", type=int, default=8)
    parser.add_argument("--clip-windows", type=int, help="calibration windows of a clip pass (default: all)")
    parser.add_argument("--gram-windows", type=int, help="calibration windows of gptq's Grams (default: all)")
    parser.add_argument("--keep", type=Path, help="write graphprune's quantized models here (kept)")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "quantize_quality.jsonl")
    parser.add_argument("--table", action="store_true", help="print the markdown table of --results and stop")
    args = parser.parse_args()
    if args.table:
        print(table([json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp)
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
        models: dict[str, tuple[Path, float]] = {}
        ours_runs = [r for r in args.runs if r not in ("fp32", "ort-static", "ort-dynamic")]
        if ours_runs:
            windows = (args.clip_windows, args.gram_windows)
            kept = args.keep or out_dir
            models.update(ours(args.model, ours_runs, args.calib, kept, args.ranges_cache, *windows))
        for run in args.runs:
            start = time.process_time()
            if run == "fp32":
                models[run] = (args.model, 0.0)
            elif run == "ort-static":
                models[run] = (ort_static(args.model, args.calib, args.ort_calib, out_dir / "s.onnx"), 0.0)
            elif run == "ort-dynamic":
                models[run] = (ort_dynamic(args.model, out_dir / "d.onnx"), 0.0)
            if run in ("ort-static", "ort-dynamic"):
                models[run] = (models[run][0], time.process_time() - start)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        for run in args.runs:
            path, seconds = models[run]
            start = time.process_time()
            ppl = perplexity(path, args.eval, args.windows)
            row = {
                "model": args.label,
                "run": run,
                "windows": args.windows,
                "ppl": round(ppl, 3),
                "quantize_cpu_s": round(seconds, 1),
                "eval_cpu_s": round(time.process_time() - start, 1),
            }
            if "clip=" in run and "clip=minmax" not in run:
                row["clip_windows"] = args.clip_windows or "all"
            if "method=gptq" in run:
                row["gram_windows"] = args.gram_windows or "all"
            print(json.dumps(row), flush=True)
            with args.results.open("a") as f:
                f.write(json.dumps(row) + "\n")


def table(rows: list[dict]) -> str:
    base = {(r["model"], r["windows"]): r["ppl"] for r in rows if r["run"] == "fp32"}
    lines = ["| model | run | windows | perplexity | x FP32 |", "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        fp32 = base.get((r["model"], r["windows"]))
        ratio = f"{r['ppl'] / fp32:.3f}" if fp32 else "-"
        lines.append(f"| {r['model']} | {r['run']} | {r['windows']} | {r['ppl']:.2f} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
