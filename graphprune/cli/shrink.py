"""``graphprune shrink``: structured pruning to a smaller dense model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from graphprune.algorithms.structured import StructuredMethod
from graphprune.cli.app import app, out, user_errors
from graphprune.cli.calib_options import (
    BatchSizeOpt,
    CalibOpt,
    NsamplesOpt,
    ProviderOpt,
    SeedOpt,
    SeqlenOpt,
    TokenizerOpt,
    calibration_request,
)
from graphprune.cli.progress import progress_bar
from graphprune.cli.tables import Col, fitted_table
from graphprune.errors import GraphpruneError
from graphprune.pipeline.files import report_path
from graphprune.pipeline.shrink import UNIT_KINDS, ShrinkConfig, ShrinkReport, shrink_file


@app.command()
@user_errors
def shrink(
    model: Annotated[Path, typer.Argument(help="The ONNX model to read (never modified). Example: model.onnx")],
    ratio: Annotated[
        float | None,
        typer.Option(
            help="Fraction of the units of every group to remove, 0 < R < 1 (the same in every group; rounded to "
            "the nearest whole unit). Example: --ratio 0.25"
        ),
    ] = None,
    ratio_for: Annotated[
        list[str] | None,
        typer.Option(
            "--ratio-for",
            help="A different ratio for the groups whose name (as the report lists them) matches a shell pattern; "
            "repeatable, the first match wins, 0 leaves them whole. "
            "Example: --ratio-for 'mlp into *linear_6*=0.5'",
        ),
    ] = None,
    units: Annotated[
        str,
        typer.Option(
            help="Which units to remove, comma-separated: mlp (hidden neurons of MLPs: gate/up → down, "
            "MatMul+Add → Gelu → MatMul+Add), heads (attention heads, whole KV groups under GQA), channels "
            "(Conv filters → the next Conv's input channels). Example: --units mlp"
        ),
    ] = ",".join(UNIT_KINDS),
    method: Annotated[
        StructuredMethod | None,
        typer.Option(
            help="Score: l2 (norm of the unit's weights, no data); wanda (Σ |W|·‖X‖ over the unit); flap "
            "(Var(X)·‖W‖², and the removed channels' mean contribution folded into the next layer's bias); obs "
            "(the output error the least-squares refit leaves without the unit, from the input's covariance, "
            "removed one at a time and each priced after those already gone: flap's score where channels are "
            "uncorrelated, lower where the kept channels can stand in). "
            "wanda, flap and obs need --calib. Default: flap with --calib, else l2 (which needs no data, but on "
            "language models loses far more than the activation-aware scores). Example: --method flap",
            show_default=False,
        ),
    ] = None,
    blocks: Annotated[
        int,
        typer.Option(
            help="Also bypass this many residual blocks, those whose output is most like their input on the "
            "calibration data (block influence 1 - cos, as ShortGPT); needs --calib. Example: --blocks 4"
        ),
    ] = 0,
    steps: Annotated[
        int,
        typer.Option(
            help="Reach --ratio in this many rounds, re-calibrating the shrunk model before each. "
            "Example: --steps 4"
        ),
    ] = 1,
    round_to: Annotated[
        int,
        typer.Option(
            help="Leave a multiple of N channels in every group (the ratio rounded to the nearest such count): N "
            "neurons or filters (groups of N or fewer stay whole), any number of heads whose head_dim N divides. "
            "ONNX Runtime's CPU convolutions use their fast blocked layout only when channel counts are multiples "
            "of 8 (16 with AVX-512); MLP MatMuls of odd widths can cost a few percent more. Example: --round-to 8"
        ),
    ] = 1,
    sequential: Annotated[
        bool,
        typer.Option(
            help="Shrink one block at a time in graph order, each calibrated on the model with the earlier blocks "
            "already shrunk (and refitted), so their errors are seen rather than compounded; the model runs "
            "block by block, about one inference pass in all (groups whose weights span two blocks: one "
            "calibration run per group). With --allocate global the ratios are chosen once on the dense model "
            "(one more pass). Example: --sequential"
        ),
    ] = False,
    target: Annotated[
        str,
        typer.Option(
            help="With --sequential, what the refit reconstructs: pruned (the outputs the shrunk prefix's own "
            "inputs give, as without --sequential) or dense (the dense model's outputs on the same windows: a "
            "dense stream runs beside the shrunk one, about twice the calibration; MLP neurons and Conv "
            "channels, not heads). Example: --sequential --target dense"
        ),
    ] = "pruned",
    target_blend: Annotated[
        float,
        typer.Option(
            help="With --target dense, the dense outputs' share of the refit's target (the rest: the shrunk "
            "prefix's own); 1 aims at the dense model. Choose it on held-out calibration text. "
            "Example: --target dense --target-blend 0.5"
        ),
    ] = 1.0,
    refit_scope: Annotated[
        str,
        typer.Option(
            help="With --target dense, which layers the refit solves: consumers (those that lose input channels: "
            "down/fc2, the next 1x1 Conv) or all (also every other MatMul/Gemm of the shrunk blocks, such as "
            "Q/K/V/O and gate/up, towards the dense outputs from the shrunk prefix's inputs, with the same blend "
            "and damping; whole-block reconstruction, weights only, streamed level by level). "
            "Example: --target dense --refit-scope all"
        ),
    ] = "consumers",
    refit: Annotated[
        bool | None,
        typer.Option(
            "--refit/--no-refit",
            help="After removing units, refit every consumer of the removed channels (down/fc2, O, the next 1x1 "
            "Conv) by least squares on the channels it keeps, and its bias, from the Gram matrix of its input on "
            "the calibration data (kxk Convs get the mean folded into the bias, as flap). Default: on with "
            "--calib. Example: --no-refit",
            show_default=False,
        ),
    ] = None,
    refit_damp: Annotated[
        float,
        typer.Option(
            help="Damping of the refit, as a fraction of the mean diagonal of the Gram matrix (as SparseGPT's "
            "percdamp); it pulls the refitted weights towards the original ones. Example: --refit-damp 0.01"
        ),
    ] = 0.01,
    gram_stride: Annotated[
        int,
        typer.Option(
            help="Measure the Gram matrices of the refit and obs on every N-th calibration row only (their own "
            "mean too): the Gram matrix of a 1536-wide MLP input costs more than the model's own forward pass "
            "per token, so 2 roughly halves that part of the calibration. Example: --gram-stride 2"
        ),
    ] = 1,
    gram_padding: Annotated[
        int,
        typer.Option(
            help="Where the model's attention_mask input marks padded tokens (text calibration of an encoder), "
            "put every N-th padded row in the Gram matrices, counted N times (an unbiased estimate of them at "
            "the real tokens' cost plus 1/N of the padding's); 0 leaves padding out, 1 keeps every row. "
            "Example: --gram-padding 0",
        ),
    ] = 8,
    allocate: Annotated[
        str | None,
        typer.Option(
            help="How --ratio is shared among the groups of one kind: uniform (the same ratio everywhere) or "
            "global (FLAP's adaptive structure: scores standardised per group, one threshold over all groups of "
            "the kind, the parameters removed equal to the uniform case) or error (the same on the raw scores, "
            "not standardised: with --method obs each unit's output error, on the scale shared by consumers that "
            "write one residual stream; suits post-LayerNorm encoders, not decoders whose residual stream grows "
            "with depth). Default: global with --calib, else uniform. global and error fit the ratios to the "
            "calibration text: when it covers less than the model will see, compare uniform on held-out text. "
            "Example: --allocate uniform",
            show_default=False,
        ),
    ] = None,
    allocate_by: Annotated[
        StructuredMethod | None,
        typer.Option(
            help="With --allocate global, share the budget among the groups by this method's scores while "
            "--method chooses the units inside each group (e.g. --method obs --allocate-by flap). Default: "
            "--method's own scores. Example: --allocate-by flap",
            show_default=False,
        ),
    ] = None,
    layer_min: Annotated[
        float,
        typer.Option(help="With --allocate global, the least ratio any group loses. Example: --layer-min 0.1"),
    ] = 0.0,
    layer_max: Annotated[
        float,
        typer.Option(help="With --allocate global, the most any group loses (< 1). Example: --layer-max 0.6"),
    ] = 0.8,
    calib: CalibOpt = None,
    tokenizer: TokenizerOpt = None,
    seqlen: SeqlenOpt = 512,
    nsamples: NsamplesOpt = 128,
    seed: SeedOpt = 0,
    batch_size: BatchSizeOpt = 1,
    provider: ProviderOpt = "cpu",
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Output model path. Default: <stem>.shrunk.onnx beside the input"),
    ] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing output.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Remove whole neurons, heads, filters or blocks and write a smaller dense model plus a JSON report.

    The LM head and the embeddings are never touched (they read or write the residual stream, not a unit).
    Example: graphprune shrink model.onnx --ratio 0.25 --units mlp --method flap --calib calib.npz -o small.onnx
    """
    config = ShrinkConfig(
        ratio=ratio,
        units=tuple(u.strip() for u in units.split(",") if u.strip()),
        method=method or (StructuredMethod.FLAP if calib else StructuredMethod.L2),
        blocks=blocks,
        steps=steps,
        round_to=round_to,
        overrides=tuple(_override(text) for text in ratio_for or ()),
        refit=refit,
        sequential=sequential,
        target=target,
        target_blend=target_blend,
        refit_scope=refit_scope,
        damp=refit_damp,
        gram_stride=gram_stride,
        pad_stride=gram_padding,
        allocate=allocate,
        allocate_by=allocate_by,
        ratio_min=layer_min,
        ratio_max=layer_max,
    )
    config.validate()
    request = calibration_request(calib, tokenizer, seqlen, nsamples, seed, batch_size, None, provider)
    with progress_bar("shrinking") as bar:
        written, report = shrink_file(
            model, config, output, force, request if calib else None, on_stage=bar.describe
        )
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=1))
    else:
        _print(report, written)


def _override(text: str) -> tuple[str, float]:
    pattern, sep, value = text.rpartition("=")
    try:
        if not sep or not pattern:
            raise ValueError
        return pattern, float(value)
    except ValueError:
        raise GraphpruneError(f"invalid --ratio-for {text!r}: expected PATTERN=RATIO, e.g. 'heads*=0.5'") from None


def _print(report: ShrinkReport, written: Path) -> None:
    rows = [
        [
            g.name,
            g.kind,
            f"{g.units_before} → {g.units_after}",
            f"{len(g.removed)} ({g.ratio:.0%})",
            f"{g.parameters_before:,} → {g.parameters_after:,}" + (" (+bias)" if g.compensated else ""),
        ]
        for g in report.groups
    ]
    if rows:
        columns = [Col("group"), Col("kind"), Col("units"), Col("removed", "right"), Col("parameters")]
        c = report.config
        title = f"graphprune shrink ({c.method.value}{', refit' if c.refit else ''}, {c.allocate})"
        out.print(fitted_table(out, columns, rows, title=title))
    gone = [b for b in report.blocks if b.removed]
    if gone:
        shown = ", ".join(f"{b.index} ({b.influence:.4f})" for b in gone)
        out.print(f"blocks bypassed (influence): {shown}", highlight=False)
    for s in report.skipped:
        out.print(f"[dim]skipped {s.name}: {s.reason}[/dim]", highlight=False)
    for w in report.warnings:
        out.print(f"[yellow]warning:[/yellow] {w}", highlight=False)
    before, after = report.parameters_before, report.parameters_after
    out.print(f"parameters {before:,} → {after:,} ({1 - after / max(before, 1):.1%} fewer)", highlight=False)
    out.print(f"model {written}\nreport {report_path(written)}", highlight=False)
