"""SmolLM2-135M, structured: Brown held-out perplexity after removing MLP neurons (l2, wanda, flap) or blocks.

Calibration is the reference's 64x512 Brown windows; evaluation its 32 held-out windows (see
/work/shared/reference/README.md). One tapped ONNX Runtime pass over the dense model measures every MLP input's
channel moments and every block's influence; each configuration then shrinks a fresh copy of the dense model from
those figures (single round, as FLAP and ShortGPT do) and is evaluated. ``--steps K`` adds K-round runs of
``--step-methods`` at the given ratios (round 1 reuses the dense model's moments, rounds 2..K re-calibrate the
shrunk model) to compare with one round. ``--moments FILE`` keeps the dense model's moments between invocations
(computed and saved when the file is missing). The moments include each MLP input's Gram matrix, which the
least-squares refit needs: ``--variants`` lists what runs at every ratio (``METHOD[+refit][+global]``, e.g.
``flap+refit+global``; without ``+refit`` the consumers get only FLAP's bias fold, without ``+global`` every MLP
loses the same ratio). ``--time-windows N`` times ``shrink`` with and without the refit from scratch (the tapped
calibration on N windows included) in one process, interleaved. Rows are merged into the JSON by configuration.

    nice -n 10 python benchmarks/shrink_smollm2_quality.py [--ratios 0.25] [--blocks 2 4 6] [--steps 0]
        [--moments /tmp/smollm2-moments.npz] [--heads 0.34] [--variants flap+refit flap+refit+global]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

try:
    from graphprune import demo
except ImportError:  # run as a script from a checkout without installing graphprune
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from graphprune import demo

import onnx_ir as ir
from shrink_variants import variant  # benchmarks/, beside this script

from graphprune.algorithms.structured import StructuredMethod
from graphprune.calibration.moments import ChannelTap, Moments, collect_moments
from graphprune.calibration.request import CalibrationRequest
from graphprune.evaluate.perplexity import perplexity
from graphprune.graph.blocks import find_blocks
from graphprune.graph.groups import find_groups
from graphprune.graph.model_io import load_model, save_model
from graphprune.graph.prepare import prepare_graph
from graphprune.pipeline.shrink import Measure, ShrinkConfig, channel_taps, shrink_model

REFERENCE = Path("/work/shared/reference")
JSON = Path(__file__).parent / "results" / "shrink_smollm2_quality.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=demo.cache_dir() / "smollm2" / "model.onnx")
    parser.add_argument("--ratios", type=float, nargs="*", default=[0.25, 0.1, 0.4])
    parser.add_argument("--blocks", type=int, nargs="*", default=[2, 4, 6])
    parser.add_argument("--methods", nargs="*", default=["l2", "wanda", "flap"], help="plain one-round runs")
    parser.add_argument("--variants", nargs="*", default=["flap+refit", "flap+refit+global", "flap+global"])
    parser.add_argument("--damp", type=float, default=0.01, help="the refit's and obs's damping")
    parser.add_argument(
        "--units", nargs="*", default=["mlp"], help="unit kinds the variants remove (mlp, heads); the moments too"
    )
    parser.add_argument("--time-windows", type=int, default=0, help="time shrink with/without refit on N windows")
    parser.add_argument(
        "--time-variants", nargs="*", default=["flap", "flap+refit"], help="what --time-windows times (first: 1.0)"
    )
    parser.add_argument("--time-rounds", type=int, default=2, help="rounds of --time-windows")
    parser.add_argument("--steps", type=int, default=0, help="also run --step-methods in this many rounds")
    parser.add_argument("--step-methods", nargs="*", default=["flap+refit"], help="variants run in --steps rounds")
    parser.add_argument("--moments", type=Path, default=None, help="cache of the dense model's moments (.npz)")
    parser.add_argument(
        "--heads", type=float, nargs="*", default=[], help="also remove this ratio of heads (KV groups) with flap"
    )
    parser.add_argument(
        "--holdout",
        type=int,
        default=0,
        help="choose options without the Brown windows: calibrate on the first 64-N reference calibration windows "
        "and measure perplexity on the last N of them (give --moments a file of its own)",
    )
    parser.add_argument("--json", type=Path, default=JSON)
    args = parser.parse_args()

    calibration = CalibrationRequest(data=str(REFERENCE / "smollm2_brown_calib.npz"), batch_size=8)
    if args.time_windows:
        out = args.json.with_name("shrink_smollm2_refit_time.json") if args.json == JSON else args.json
        time_refit(args.model, args.time_windows, out, args.time_rounds, args.time_variants)
        return
    windows = np.load(REFERENCE / "smollm2_brown_eval.npz")["input_ids"]
    if args.holdout:  # the calibration windows split in two: the Brown held-out windows are not read
        data = np.load(REFERENCE / "smollm2_brown_calib.npz")
        split = len(data["input_ids"]) - args.holdout
        calibration = CalibrationRequest(data={k: data[k][:split] for k in data.files}, batch_size=8)
        windows = data["input_ids"][split:]
    previous = json.loads(args.json.read_text()) if args.json.exists() else {}
    if args.moments is not None and args.moments.exists():
        moments = load_moments(args.moments)
        calib_seconds = previous.get("calibration_seconds")
        print(f"dense moments from {args.moments}", flush=True)
    else:
        dense = load_model(args.model)
        prepare_graph(dense, heads="heads" in args.units)  # as shrink prepares its copy: the same tap names
        taps = channel_taps(find_groups(dense, tuple(args.units)).groups, gram=True)
        pairs = [(b.input.name, b.output.name) for b in find_blocks(dense)]
        t0 = time.perf_counter()
        moments = collect_moments(dense, taps, pairs, calibration)  # type: ignore[arg-type]
        calib_seconds = round(time.perf_counter() - t0, 1)
        print(
            f"calibrated {len(taps)} consumer inputs and {len(pairs)} blocks in {calib_seconds:.0f} s", flush=True
        )
        del dense
        if args.moments is not None:
            save_moments(moments, args.moments)

    def cached(model: ir.Model, channels: list[ChannelTap], wanted: list[tuple[str, str]]) -> Moments:
        return moments

    def dense_then_calibrated() -> Measure:
        """Round 1 sees the dense model (its moments are cached); later rounds calibrate the shrunk model."""
        calls = []

        def measure(model: ir.Model, channels: list[ChannelTap], wanted: list[tuple[str, str]]) -> Moments:
            calls.append(1)
            if len(calls) == 1:
                return moments
            return collect_moments(model, channels, wanted, calibration)

        return measure

    results: list[dict] = previous.get("results", [])
    units = tuple(args.units)
    # (variant name, configuration, True: the cached moments / False: cached, then calibrated / None: afresh)
    runs: list[tuple[str, ShrinkConfig, bool | None]] = []
    for ratio in args.ratios:
        runs += [(v, variant(v, ratio, units, damp=args.damp), True) for v in args.variants]
        for m in args.methods:
            runs.append((m, variant(m, ratio, units, damp=args.damp), True))
        if args.steps > 1:
            stepped = [(v, replace(variant(v, ratio, units, damp=args.damp), steps=args.steps)) for v in
                       args.step_methods]  # fmt: skip
            runs += [(v, config, False) for v, config in stepped]
        if ratio == args.ratios[0]:  # the blocks right after the first ratio: most wanted first
            runs += [("blocks", ShrinkConfig(blocks=n), True) for n in args.blocks]
    runs += [
        ("flap", ShrinkConfig(ratio=r, units=("heads",), method=StructuredMethod.FLAP), None) for r in args.heads
    ]
    reference = json.loads((REFERENCE / "smollm2_brown_reference.json").read_text())
    dense_ppl = next(r["brown_heldout_ppl"] for r in reference["results"] if r["method"] == "dense")
    with tempfile.TemporaryDirectory(prefix="graphprune-shrink-quality-") as tmp:
        for name, config, use_cache in runs:
            model = load_model(args.model)  # a fresh dense copy
            t = time.perf_counter()
            t_cpu = time.process_time()
            measure = None if use_cache is None else cached if use_cache else dense_then_calibrated()
            report = shrink_model(model, config, calibration, measure=measure)  # type: ignore[arg-type]
            seconds, cpu_seconds = time.perf_counter() - t, time.process_time() - t_cpu
            path = Path(tmp) / "shrunk.onnx"
            save_model(model, path)
            ppl = perplexity(path, windows)
            row = {
                "units": "blocks" if config.blocks else ",".join(config.units),
                "variant": name,
                "method": "block influence" if config.blocks else config.method.value,
                "ratio": config.ratio,
                "blocks": config.blocks,
                "steps": config.steps,
                "refit": bool(report.config.refit) and config.ratio is not None,
                "damp": config.damp,
                "allocate": report.config.allocate,
                "layer_ratios": [g.ratio for g in report.groups],
                "brown_heldout_ppl": round(ppl, 2),  # with --holdout: the calibration text's held-out windows
                "evaluated_on": f"last {args.holdout} calibration windows" if args.holdout else "Brown held-out",
                "parameters": report.parameters_after,
                "parameters_dense": report.parameters_before,
                "shrink_seconds": round(seconds, 1),
                "shrink_cpu_seconds": round(cpu_seconds, 1),
                "blocks_removed": [b.index for b in report.blocks if b.removed],
            }
            results = [r for r in results if _key(r) != _key(row)] + [row]
            print(json.dumps(row), flush=True)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(
                json.dumps(
                    {
                        "model": str(args.model),
                        "dense_ppl_reference": dense_ppl,
                        "calibration_seconds": calib_seconds,
                        "results": results,
                    },
                    indent=1,
                )
                + "\n"
            )


def time_refit(
    model_path: Path,
    windows: int,
    out: Path,
    rounds: int = 2,
    variants: tuple[str, ...] | list[str] = ("flap", "flap+refit"),
) -> None:
    """``shrink`` at 25% of MLP neurons from scratch (tapped calibration on ``windows`` windows, scores, slicing),
    each of ``variants`` in turn in this process (flap with and without the refit by default): CPU and wall
    seconds of each, and each one's CPU seconds over the first's."""
    data = np.load(REFERENCE / "smollm2_brown_calib.npz")
    request = CalibrationRequest(data={k: data[k][:windows] for k in data.files}, batch_size=8)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name in times:
            model = load_model(model_path)
            t, t_cpu = time.perf_counter(), time.process_time()
            shrink_model(model, variant(name, 0.25, ("mlp",)), request)
            times[name].append((time.perf_counter() - t, time.process_time() - t_cpu))
            print(name, times[name][-1], flush=True)
            del model
    cpu = {k: float(np.median([c for _, c in v])) for k, v in times.items()}
    row = {
        "windows": windows,
        "rounds": rounds,
        "seconds": {k: [round(w, 1) for w, _ in v] for k, v in times.items()},
        "cpu_seconds": {k: [round(c, 1) for _, c in v] for k, v in times.items()},
        "over_first_cpu": {k: round(v / cpu[variants[0]], 3) for k, v in cpu.items()},
    }
    print(json.dumps(row), flush=True)
    out.write_text(json.dumps(row, indent=1) + "\n")


def _key(row: dict) -> tuple:
    # "units": mlp, heads, blocks; rows from before the refit and the allocation existed were uniform, no refit
    extra = row.get("refit", False), row.get("allocate", "uniform"), row.get("damp", 0.01), row.get("variant")
    return row["units"], row["method"], row["ratio"], row["blocks"], row["steps"], *extra


def save_moments(moments: Moments, path: Path) -> None:
    """The dense moments as one .npz (per-batch pair terms concatenated: influence concatenates them anyway)."""
    arrays: dict[str, np.ndarray] = {}
    taps = sorted(moments.sums)
    for i, name in enumerate(taps):
        arrays[f"sums_{i}"], arrays[f"sumsq_{i}"] = moments.sums[name], moments.sumsq[name]
        arrays[f"rows_{i}"] = np.array(moments.rows[name])
        if name in moments.grams:
            arrays[f"gram_{i}"] = moments.grams[name]
    pairs = list(moments.pair_terms)
    for i, pair in enumerate(pairs):
        for part, terms in zip(("dot", "na", "nb"), zip(*moments.pair_terms[pair], strict=True), strict=True):
            arrays[f"{part}_{i}"] = np.concatenate(terms)
    index = {"taps": taps, "pairs": pairs, "warnings": moments.warnings}
    np.savez(path, index=np.array(json.dumps(index)), **arrays)


def load_moments(path: Path) -> Moments:
    data = np.load(path)
    index = json.loads(str(data["index"]))
    out = Moments(warnings=index["warnings"])
    for i, name in enumerate(index["taps"]):
        out.sums[name], out.sumsq[name] = data[f"sums_{i}"], data[f"sumsq_{i}"]
        out.rows[name] = int(data[f"rows_{i}"])
        if f"gram_{i}" in data:
            out.grams[name] = data[f"gram_{i}"]
    for i, pair in enumerate(index["pairs"]):
        out.pair_terms[tuple(pair)] = [[data[f"{part}_{i}"] for part in ("dot", "na", "nb")]]
    return out


if __name__ == "__main__":
    main()
