"""``graphprune quantize``: a Q/DQ model (int8 W8A8, fp8, int4 weight-only) that keeps the sparse pattern."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from graphprune.cli.app import app, console, out, user_errors
from graphprune.cli.calib_options import (
    BatchSizeOpt,
    CalibOpt,
    NsamplesOpt,
    ProviderOpt,
    SeedOpt,
    SeqlenOpt,
    ShapeOpt,
    TokenizerOpt,
    calibration_request,
)
from graphprune.cli.progress import progress_bar
from graphprune.cli.tables import Col, fitted_table
from graphprune.pipeline.files import report_path
from graphprune.quantize.config import QuantizeConfig
from graphprune.quantize.files import QuantizeReport, quantize_file


@app.command()
@user_errors
def quantize(
    model: Annotated[Path, typer.Argument(help="The ONNX model to read (never modified). Example: model.onnx")],
    precision: Annotated[
        str,
        typer.Option(
            help="int8: W8A8, int8 weights per output channel and int8 activations per tensor (static scales from "
            "--calib); fp8: E4M3 weights per channel and activations per tensor (opset 19); int4: weight-only, "
            "one scale per --block-size weights along K (opset 21), activations stay float. Weights are always "
            "symmetric (zero point 0), so pruned zeros stay zero. Example: --precision int8"
        ),
    ] = "int8",
    method: Annotated[
        str,
        typer.Option(
            help="Weight rounding: rtn (round to nearest) or gptq (error compensation under the mask). "
            "Example: --method rtn"
        ),
    ] = "rtn",
    act_order: Annotated[
        bool,
        typer.Option(
            help="--method gptq: round the columns in order of descending input energy (Gram diagonal) while the "
            "block scales stay those of the original weights (static groups), so the int4 blocks along K are "
            "the file's blocks. Example: --act-order"
        ),
    ] = False,
    weight_clip: Annotated[
        str,
        typer.Option(
            help="Weight scales: none (absmax of each group), mse (the shrink of the absmax, 1.0 down to 0.6, "
            "with the smallest rounding error of the group's weights) or hessian (the same, the error weighted "
            "by the calibration Gram matrix; needs --calib or --stats). Example: --weight-clip hessian"
        ),
    ] = "none",
    percdamp: Annotated[
        float,
        typer.Option(help="--method gptq: dampening, a fraction of mean(diag XᵀX). Example: --percdamp 0.01"),
    ] = 0.01,
    sequential: Annotated[
        bool,
        typer.Option(
            help="--method gptq: measure each block's Gram matrices on the model whose earlier blocks are already "
            "quantized, as the GPTQ reference does (about one more inference pass; needs --calib). "
            "Example: --sequential"
        ),
    ] = False,
    awq: Annotated[
        bool,
        typer.Option(
            "--awq",
            help="int4: activation-aware weight scaling (AWQ) before rounding: per input channel scales "
            "sqrt(diag XᵀX)^alpha, alpha searched per activation (0 to 1 in steps of 0.05) for the least output "
            "error of the rounded weights on the calibration Gram matrices, folded exactly into the producing "
            "norm or projection; pruned zeros stay zero. Then --method rtn or gptq rounds the scaled weights "
            "(needs --calib or --stats; with --sequential the search reads --stats or one more calibration run). "
            "Example: --awq",
        ),
    ] = False,
    refit_scales: Annotated[
        bool,
        typer.Option(
            "--refit-scales",
            help="Once the codes are fixed (rtn or gptq), re-solve each output row's scales by least squares "
            "for the least output error on the calibration Gram matrix (a row keeps its scales where that is "
            "no better); the codes, and so the pruned zeros, do not change. Needs --calib or --stats. "
            "Example: --refit-scales",
        ),
    ] = False,
    smooth: Annotated[
        float | None,
        typer.Option(
            help="SmoothQuant strength alpha in [0, 1]: move activation outliers into the weights, folded exactly "
            "into the producing norm or projection; needs --calib for good ranges. Example: --smooth 0.5",
            show_default=False,
        ),
    ] = None,
    target: Annotated[
        str,
        typer.Option(
            help="Activation grid: tensorrt (symmetric int8, zero point 0: the only form TensorRT reads) or ort "
            "(asymmetric uint8: ONNX Runtime's CPU kernels, measured 1.6x faster here). int4: where K is not a "
            "multiple of --block-size, ort writes ONNX's shorter last block, tensorrt the same weights in blocks "
            "of gcd(K, block size) (TensorRT needs whole blocks). Example: --target ort"
        ),
    ] = "tensorrt",
    float_above: Annotated[
        float | None,
        typer.Option(
            help="Leave float (and list) the weights whose calibrated input reaches |x| above this, after "
            "smoothing: one per-tensor int8 scale cannot hold an LLM's massive activations and the small values "
            "beside them. Example: --float-above 100",
            show_default=False,
        ),
    ] = None,
    clip: Annotated[
        str,
        typer.Option(
            help="Range of each static activation scale: minmax (the calibrated range), mse (the clip of it with "
            "the least squared quantization error) or percentile (the narrowest clip holding --percentile of "
            "|x|). "
            "mse and percentile score 24 candidate clips inside ONNX Runtime in one more calibration run (after "
            "--smooth); no activation is stored. Example: --clip mse"
        ),
    ] = "minmax",
    percentile: Annotated[
        float, typer.Option(help="--clip percentile: the share of |x| (in %) the range holds. Example: 99.99")
    ] = 99.99,
    dynamic: Annotated[
        bool,
        typer.Option(
            help="int8 activations quantized at run time (DynamicQuantizeLinear, uint8) instead of calibrated "
            "static scales: no calibration, ONNX Runtime only (TensorRT cannot read it)."
        ),
    ] = False,
    block_size: Annotated[
        int,
        typer.Option(
            help="int4: weights per scale along K (32, 64 or 128); where K is not a multiple, the last block of "
            "each column is shorter. Example: --block-size 64"
        ),
    ] = 128,
    include_head: Annotated[
        bool,
        typer.Option(
            "--include-head",
            help="Also quantize the final projection to a model output (left float by default). A head tied to "
            "the embedding table gets its own int8 copy; the embedding Gather keeps the float table.",
        ),
    ] = False,
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            "--exclude",
            help="Leave weights whose name or node name matches this shell pattern float (repeatable). "
            "Example: --exclude '*down_proj*'",
        ),
    ] = None,
    bmm: Annotated[
        bool,
        typer.Option(
            "--bmm/--no-bmm",
            help="Also quantize the MatMuls of two activations (attention's Q.K^T and probabilities.V, TensorRT's "
            "BMM1/BMM2): static per-tensor scales on both operands, [0, 1] for softmax probabilities (int8, fp8; "
            "not with --dynamic). Off by default: no faster on ONNX Runtime's CPU here, and a quality cost "
            "(BENCHMARKS.md); TensorRT's INT8 BERT engines quantize both.",
        ),
    ] = False,
    fuse_attention: Annotated[
        bool,
        typer.Option(
            "--fuse-attention/--no-fuse-attention",
            help="--target ort: replace each attention core (Q.K^T, scale, mask, softmax, .V and their head "
            "reshapes) by ONNX Runtime's fused MultiHeadAttention kernel. Not bit-exact (float sums in another "
            "order); cores the matcher does not recognise stay as they are, listed in the report. Not with --bmm.",
        ),
    ] = True,
    stats: Annotated[
        Path | None,
        typer.Option(
            help="Gram matrices saved by `graphprune calibrate --gram`, for --method gptq, --weight-clip hessian, "
            "--awq and --refit-scales (default: from --calib). Example: --stats stats.npz",
            show_default=False,
        ),
    ] = None,
    calib: CalibOpt = None,
    tokenizer: TokenizerOpt = None,
    seqlen: SeqlenOpt = 512,
    nsamples: NsamplesOpt = 128,
    seed: SeedOpt = 0,
    batch_size: BatchSizeOpt = 1,
    shape: ShapeOpt = None,
    provider: ProviderOpt = "cpu",
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Output model. Default: <stem>.<precision>.onnx beside the input."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing output.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Quantize a (pruned) model to Q/DQ ONNX and write it plus a JSON report; the N:M pattern is kept and proved.

    Activation ranges are measured inside ONNX Runtime on --calib data (running min/max per tensor); without
    --calib, on synthetic inputs (with a warning). The LM head, embeddings and weights a Gather also reads stay
    float; the report lists every float weight and why. For ONNX Runtime on a CPU use --target ort: its
    optimiser turns every uint8-activation MatMul into an integer kernel but only some int8 ones (SmolLM2,
    one 512-token window: 1.75x FP32 against 1.07x; BENCHMARKS.md). For LLMs, --smooth 0.8 keeps int8 within
    5% of FP32 perplexity where round to nearest alone does not.

    Example: graphprune quantize model.pruned.onnx --precision int8 --calib calib.npz -o model.int8.onnx
    """
    config = QuantizeConfig(
        precision=precision,  # type: ignore[arg-type]  # typer's str; QuantizeConfig checks the Literal
        method=method,  # type: ignore[arg-type]  # as above
        target=target,  # type: ignore[arg-type]  # as above
        dynamic=dynamic,
        block_size=block_size,
        smooth=smooth,
        include_head=include_head,
        exclude=tuple(exclude or ()),
        float_above=float_above,
        clip=clip,  # type: ignore[arg-type]  # typer's str; QuantizeConfig checks the Literal
        percentile=percentile,
        bmm=bmm,
        weight_clip=weight_clip,  # type: ignore[arg-type]  # as above
        act_order=act_order,
        percdamp=percdamp,
        sequential=sequential,
        fuse_attention=fuse_attention,
        awq=awq,
        refit_scales=refit_scales,
    )
    config.validate()
    request = calibration_request(calib, tokenizer, seqlen, nsamples, seed, batch_size, shape, provider)
    with progress_bar("quantizing") as bar:
        written, report = quantize_file(model, config, output, request, force, bar.describe, stats)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=1))
    else:
        _print(report, written)


def _print(report: QuantizeReport, written: Path) -> None:
    rows = [
        [w.name, w.op, w.precision, w.method, f"{w.sparsity:.1%}", f"{w.relative_error:.4f}"]
        for w in report.result.weights
    ]
    columns = [Col("weight"), Col("op"), Col("precision"), Col("method"), Col("zeros", "right")]
    columns.append(Col("rel. error", "right"))
    out.print(fitted_table(out, columns, rows, title=f"graphprune quantize ({report.config.precision})"))
    smoothed = [s for s in report.smoothing if s.smoothed]
    if report.smoothing:
        out.print(f"smoothed {len(smoothed)} of {len(report.smoothing)} activations", highlight=False)
    if report.awq:
        alphas = ", ".join(sorted({f"{a.alpha:g}" for a in report.awq}))
        before, after = sum(a.unscaled_error for a in report.awq), sum(a.error for a in report.awq)
        gain = f", rounding's output error {after / before - 1:+.1%}" if before > 0 else ""
        out.print(f"activation-aware scales: alpha {alphas}{gain}", highlight=False)
    for k in report.kept:
        out.print(f"[dim]kept float {k.name}: {k.reason}[/dim]", highlight=False)
    for w in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}", highlight=False)
    acts = Counter("dynamic" if a.scale is None else "static" for a in report.result.activations)
    shown = ", ".join(f"{n} {kind}" for kind, n in acts.items()) or "none (weight-only)"
    out.print(f"{len(report.result.weights)} weights quantized; activations quantized: {shown}", highlight=False)
    if report.config.clip != "minmax":
        fractions = [a.clip for a in report.result.activations]
        narrower = [f for f in fractions if f < 1.0]
        smallest = f", the narrowest {min(narrower):.3g} of max |x|" if narrower else ""
        clipped = f"{len(narrower)} of {len(fractions)} activation ranges clipped"
        out.print(f"--clip {report.config.clip}: {clipped}{smallest}", highlight=False)
    if report.result.matmuls:
        out.print(f"activation x activation MatMuls quantized: {len(report.result.matmuls)}", highlight=False)
    moved, gelus, sums = (
        report.rewrites.get(k, []) for k in ("nan_guards_moved", "gelus_reordered", "layer_norm_sums")
    )
    if moved or gelus or sums:
        out.print(
            f"exact rewrites for ONNX Runtime: {len(moved)} softmax NaN guards moved past their MatMul, "
            f"{len(gelus)} erf GELUs reordered for its Gelu fusion, {len(sums)} residual Adds before "
            "LayerNormalization written as Sum (its SkipLayerNormalization kernel is slower)",
            highlight=False,
        )
    fused, unfused = (report.rewrites.get(k, []) for k in ("attention_fused", "attention_not_fused"))
    if fused or unfused:
        out.print(f"attention cores fused into MultiHeadAttention: {len(fused)}", highlight=False)
    for reason in unfused:
        out.print(f"[dim]attention left unfused, {reason}[/dim]", highlight=False)
    for name in report.untied:
        out.print(
            f"head tied to {name}: quantized as its own copy, the embedding table stays float", highlight=False
        )
    if report.opset_raised_from is not None:
        out.print(f"opset raised from {report.opset_raised_from} to {report.config.opset}", highlight=False)
    out.print(f"model {written}\nreport {report_path(written)}", highlight=False)
