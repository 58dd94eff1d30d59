"""Weight-only int4 (symmetric, blocks of 128 along K) on SmolLM2-135M: round to nearest against GPTQ, dense and
under a 2:4 mask, and SparseGPT's joint prune-and-quantize mode against pruning then GPTQ.

Quality is measured in float: each quantized weight is written back as its dequantized values (``code · scale``),
which is what a DequantizeLinear → MatMul model computes, up to float rounding. Perplexity and windows are those
of ``benchmarks/smollm2_quality.py`` (the reference protocol: 64 x 512 calibration tokens, 32 x 513 held-out
Brown tokens). GPTQ calibrates sequentially, block by block, each block on the outputs of the already quantized
blocks (graphprune's ``SequentialCalibration``, Gram matrices of the 64 calibration windows); the LM head and
embeddings stay float. Under a mask, the mask is the base model's zeros.

    python benchmarks/quantize_int4.py --runs dense:fp32 dense:rtn dense:gptq alps24:rtn alps24:gptq
    python benchmarks/quantize_int4.py --runs joint-sparsegpt sparsegpt24:gptq
    python benchmarks/quantize_int4.py --table

A run is BASE:METHOD (BASE a model of ``--base NAME=PATH``, defaults ``dense`` = the exported model, ``alps24`` =
the lead's ALPS 2:4 sequential model, ``sparsegpt24`` = SparseGPT 2:4 sequential, made by ``graphprune apply`` on
first use; METHOD ``fp32``, ``rtn``, ``gptq`` or ``gptq-act`` with activation order) or ``joint-sparsegpt`` /
``joint-alps`` (``graphprune apply --method M --nm 2:4 --sequential --quantize int4``: a Q/DQ model with the
solver's codes, scored with float compute, ``ppl``, and with ONNX Runtime's default int8 activations in its fused
int4 kernel, ``ppl_ort_default``). CPU seconds are this
process's (or the child's) user + system time, calibration included; results are appended to ``--results``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from smollm2_quality import CACHE, REFERENCE, timed  # noqa: E402

from graphprune.algorithms.gptq import gptq_quantize  # noqa: E402
from graphprune.algorithms.layout import from_canonical, to_canonical  # noqa: E402
from graphprune.algorithms.pattern import NMPattern  # noqa: E402
from graphprune.algorithms.quant_grid import QuantGrid, dequantize_codes, fake_quantize  # noqa: E402
from graphprune.algorithms.scores import Method  # noqa: E402
from graphprune.evaluate.perplexity import perplexity as model_perplexity  # noqa: E402
from graphprune.graph.model_io import load_model, save_model  # noqa: E402
from graphprune.graph.stored import stored_values  # noqa: E402
from graphprune.graph.weights import read_weight  # noqa: E402
from graphprune.passes.prune import PruneConfig, PrunePass  # noqa: E402
from graphprune.pipeline.sequential import SequentialCalibration  # noqa: E402

GRID = QuantGrid(precision="int4", block_size=128)


def _write(model, target, values: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    weight = read_weight(stored_values(model.graph), target)
    stored = from_canonical(values[:, None, :], target.shape, target.k_axis, target.out_axis)
    weight.write(stored.astype(weight.values.dtype))


def _canonical(model, target) -> np.ndarray:  # type: ignore[no-untyped-def]
    weight = read_weight(stored_values(model.graph), target)
    return to_canonical(weight.values, target.k_axis, target.out_axis)[:, 0, :]


def quantize_model(base: Path, out: Path, method: str, calib: Path, masked: bool, batch: int) -> dict:
    """Write ``base`` with every targeted weight on the int4 grid: round to nearest, or sequential GPTQ (under
    the base's zeros when ``masked``)."""
    model = load_model(base)
    # The targets of a 2:4 prune: every MatMul/Gemm weight with K a multiple of 4, the LM head excluded.
    targets, _ = PrunePass(config=PruneConfig(NMPattern(2, 4), method=Method.SPARSEGPT)).plan(model)
    start = time.process_time()
    if method == "rtn":
        for target in targets:
            _write(model, target, fake_quantize(_canonical(model, target), GRID))
    else:
        with np.load(calib) as data:
            feeds = {name: data[name] for name in ("input_ids", "attention_mask")}
        n = len(feeds["input_ids"])
        batches = [{k: v[i : i + batch] for k, v in feeds.items()} for i in range(0, n, batch)]

        def quantize_group(group, stats) -> None:  # type: ignore[no-untyped-def]
            for target in group:
                w = _canonical(model, target)
                keep = w != 0 if masked else None
                act_order = method == "gptq-act"
                codes, scales = gptq_quantize(w, stats.gram[target.name], GRID, keep=keep, act_order=act_order)
                _write(model, target, dequantize_codes(codes, scales, GRID))

        SequentialCalibration(model, batches, ["CPUExecutionProvider"], gram=True).run(targets, quantize_group)
    cpu = time.process_time() - start
    save_model(model, out)
    return {"weights": len(targets), "cpu_seconds": cpu}


def apply_model(method: str, out: Path, args: argparse.Namespace, quantize: bool) -> dict:
    """``graphprune apply`` 2:4 sequential (joint with int4 when ``quantize``) in a child process."""
    cli = ["apply", str(args.bases["dense"]), "--nm", "2:4", "--method", method, "--sequential"]
    cli += ["--calib", str(args.calib), "--batch-size", str(args.batch), "-o", str(out), "--force"]
    if quantize:
        cli += ["--quantize", "int4", "--quant-block-size", str(GRID.block_size)]
    seconds, cpu, peak, _ = timed(cli, None)
    return {"cpu_seconds": cpu, "seconds": seconds, "peak_mb": peak}


def perplexity(model: Path, args: argparse.Namespace, accuracy_level: int | None = None) -> float:
    """Brown held-out perplexity on the first ``--eval-windows`` reference windows (all 32 by default).

    ``accuracy_level``: ONNX Runtime's ``session.qdq_matmulnbits_accuracy_level`` for a Q/DQ int4 model, whose
    DequantizeLinear → MatMul its optimiser fuses into MatMulNBits: 0 computes in float (weight-only int4, what the
    float model on the grid computes), the default (4) quantizes the activations to int8 at run time."""
    import onnxruntime as ort

    from graphprune.calibration.providers import session_options

    options = session_options(optimize=True)
    if accuracy_level is not None:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    with np.load(args.eval) as data:
        return model_perplexity(session, data["input_ids"][: args.eval_windows])


def calibration_subset(args: argparse.Namespace) -> Path:
    """The first ``--calib-windows`` reference calibration windows, as an .npz both GPTQ and ``apply`` read."""
    path = args.workdir / f"calib_{args.calib_windows}.npz"
    if not path.exists():
        with np.load(args.calib) as data:
            np.savez(path, **{k: data[k][: args.calib_windows] for k in ("input_ids", "attention_mask")})
    return path


def one_run(text: str, args: argparse.Namespace) -> dict:
    work = args.workdir
    if text.startswith("joint-"):
        method = text.split("-", 1)[1]
        out = work / f"{text}.onnx"
        info = apply_model(method, out, args, quantize=True)  # a Q/DQ model with the solver's codes
        scored = {"ppl": perplexity(out, args, accuracy_level=0), "ppl_ort_default": perplexity(out, args)}
        return {"run": text, **scored, **info}
    base_name, method = text.split(":")
    base = args.bases[base_name]
    if not base.exists() and base_name == "sparsegpt24":
        apply_model("sparsegpt", base, args, quantize=False)
    if not base.exists():
        raise SystemExit(f"{base} is missing (base {base_name})")
    if method == "fp32":
        return {"run": text, "ppl": perplexity(base, args), "cpu_seconds": 0.0}
    out = work / f"{base_name}_{method}.onnx"
    info = quantize_model(base, out, method, args.calib, masked=base_name != "dense", batch=args.batch)
    return {"run": text, "ppl": perplexity(out, args), **info}


def table(results: list[dict]) -> str:
    by_run = {r["run"]: r for r in results}
    lines = [
        "| model | int4 g128 method | perplexity | x its FP32 | CPU s |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in results:
        base = "2:4 sparsegpt+int4 (joint)" if r["run"].startswith("joint-sparsegpt") else r["run"].split(":")[0]
        base = "2:4 alps+int4 (joint)" if r["run"].startswith("joint-alps") else base
        method = r["run"].split(":")[1] if ":" in r["run"] else "joint"
        fp32_run = "sparsegpt24:fp32" if r["run"] == "joint-sparsegpt" else f"{r['run'].split(':')[0]}:fp32"
        fp32_run = "alps24:fp32" if r["run"] == "joint-alps" else fp32_run
        fp32 = by_run.get(fp32_run)
        ratio = f"{r['ppl'] / fp32['ppl']:.3f}" if fp32 else "-"
        lines.append(f"| {base} | {method} | {r['ppl']:.2f} | {ratio} | {r.get('cpu_seconds', 0):.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=Path, default=REFERENCE / "smollm2_brown_calib.npz")
    parser.add_argument("--eval", type=Path, default=REFERENCE / "smollm2_brown_eval.npz")
    parser.add_argument("--eval-windows", type=int, default=32, help="held-out windows to score (of 32)")
    parser.add_argument("--calib-windows", type=int, default=64, help="calibration windows to use (of 64)")
    parser.add_argument("--batch", type=int, default=8, help="calibration windows per ONNX Runtime run")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "quantize_int4.json")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/graphprune-int4"))
    parser.add_argument("--base", action="append", default=[], help="NAME=PATH of a base model")
    parser.add_argument("--runs", nargs="*", default=["dense:fp32", "dense:rtn", "dense:gptq"])
    parser.add_argument("--table", action="store_true", help="only print the table of the results so far")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.bases = {
        "dense": CACHE / "smollm2" / "model.onnx",
        "alps24": CACHE / "bench" / "smollm2_alps24.onnx",
        "sparsegpt24": args.workdir / "sparsegpt24.onnx",
    }
    for item in args.base:
        name, _, path = item.partition("=")
        args.bases[name] = Path(path)
    args.calib = calibration_subset(args)
    results = json.loads(args.results.read_text()) if args.results.exists() else []
    if not args.table:
        for text in args.runs:
            result = one_run(text, args)
            result.update(eval_windows=args.eval_windows, calib_windows=args.calib_windows)
            print(json.dumps(result), flush=True)
            results = [r for r in results if r["run"] != result["run"]] + [result]
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
