"""SmolLM2-135M, structured: Brown held-out perplexity after removing MLP neurons (l2, wanda, flap) or blocks.

Calibration is the reference's 64x512 Brown windows; evaluation its 32 held-out windows (see
/work/shared/reference/README.md). One tapped ONNX Runtime pass over the dense model measures every MLP input's
channel moments and every block's influence; each configuration then shrinks a fresh copy of the dense model from
those figures (single round, as FLAP and ShortGPT do) and is evaluated. ``--steps K`` adds K-round runs of wanda
and flap at the given ratios (re-calibrating between rounds) to compare with one round.

    nice -n 10 python benchmarks/shrink_smollm2_quality.py [--ratios 0.25] [--blocks 2 4 6] [--steps 0]
"""

from __future__ import annotations

import argparse
import json
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

import onnx_ir as ir

from graphprune.algorithms.structured import StructuredMethod
from graphprune.calibration.moments import ChannelTap, Moments, collect_moments
from graphprune.calibration.request import CalibrationRequest
from graphprune.evaluate.perplexity import perplexity
from graphprune.graph.blocks import find_blocks
from graphprune.graph.groups import find_groups
from graphprune.graph.model_io import load_model, save_model
from graphprune.pipeline.shrink import ShrinkConfig, channel_taps, shrink_model

REFERENCE = Path("/work/shared/reference")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=demo.cache_dir() / "smollm2" / "model.onnx")
    parser.add_argument("--ratios", type=float, nargs="*", default=[0.25, 0.1, 0.4])
    parser.add_argument("--blocks", type=int, nargs="*", default=[2, 4, 6])
    parser.add_argument("--methods", nargs="*", default=["l2", "wanda", "flap"])
    parser.add_argument("--steps", type=int, default=0, help="also run wanda and flap in this many rounds")
    parser.add_argument(
        "--json", type=Path, default=Path(__file__).parent / "results" / "shrink_smollm2_quality.json"
    )
    args = parser.parse_args()

    calibration = CalibrationRequest(data=str(REFERENCE / "smollm2_brown_calib.npz"), batch_size=8)
    windows = np.load(REFERENCE / "smollm2_brown_eval.npz")["input_ids"]
    dense = load_model(args.model)
    taps = channel_taps(find_groups(dense, ("mlp",)).groups)
    pairs = [(b.input.name, b.output.name) for b in find_blocks(dense)]
    t0 = time.perf_counter()
    moments = collect_moments(dense, taps, pairs, calibration)  # type: ignore[arg-type]
    calib_seconds = time.perf_counter() - t0
    print(f"calibrated {len(taps)} MLP inputs and {len(pairs)} blocks in {calib_seconds:.0f} s", flush=True)
    del dense

    def cached(model: ir.Model, channels: list[ChannelTap], wanted: list[tuple[str, str]]) -> Moments:
        return moments

    results: list[dict] = []
    runs: list[tuple[ShrinkConfig, bool]] = []
    for ratio in args.ratios:
        for m in args.methods:
            runs.append((ShrinkConfig(ratio=ratio, units=("mlp",), method=StructuredMethod(m)), True))
        if args.steps > 1:
            runs += [
                (ShrinkConfig(ratio=ratio, units=("mlp",), method=StructuredMethod(m), steps=args.steps), False)
                for m in ("wanda", "flap")
            ]
        if ratio == args.ratios[0]:  # the blocks right after the first ratio: most wanted first
            runs += [(ShrinkConfig(blocks=n), True) for n in args.blocks]
    reference = json.loads((REFERENCE / "smollm2_brown_reference.json").read_text())
    dense_ppl = next(r["brown_heldout_ppl"] for r in reference["results"] if r["method"] == "dense")
    with tempfile.TemporaryDirectory(prefix="graphprune-shrink-quality-") as tmp:
        for config, use_cache in runs:
            model = load_model(args.model)  # a fresh dense copy
            t = time.perf_counter()
            report = shrink_model(model, config, calibration, measure=cached if use_cache else None)  # type: ignore[arg-type]
            seconds = time.perf_counter() - t
            path = Path(tmp) / "shrunk.onnx"
            save_model(model, path)
            ppl = perplexity(path, windows)
            row = {
                "units": "blocks" if config.blocks else "mlp",
                "method": "block influence" if config.blocks else config.method.value,
                "ratio": config.ratio,
                "blocks": config.blocks,
                "steps": config.steps,
                "brown_heldout_ppl": round(ppl, 2),
                "parameters": report.parameters_after,
                "parameters_dense": report.parameters_before,
                "shrink_seconds": round(seconds, 1),
                "blocks_removed": [b.index for b in report.blocks if b.removed],
            }
            results.append(row)
            print(json.dumps(row), flush=True)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(
                json.dumps(
                    {
                        "model": str(args.model),
                        "dense_ppl_reference": dense_ppl,
                        "calibration_seconds": round(calib_seconds, 1),
                        "results": results,
                    },
                    indent=1,
                )
                + "\n"
            )


if __name__ == "__main__":
    main()
