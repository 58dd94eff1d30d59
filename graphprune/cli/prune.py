"""``graphprune apply`` and ``graphprune check``."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated

import onnx_ir as ir
import typer
from rich.table import Table

from graphprune.algorithms.pattern import NMPattern, Scope
from graphprune.algorithms.scores import Method
from graphprune.calibration.stats import ActivationStats
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
from graphprune.cli.options import pattern_from_options
from graphprune.cli.progress import progress_bar, segment_detail
from graphprune.errors import GraphpruneError
from graphprune.graph.model_io import load_model
from graphprune.graph.targets import find_targets
from graphprune.passes.check import CheckPass, CheckResult
from graphprune.passes.prune import PruneConfig, PruneResult
from graphprune.pipeline.boundary import parse_memory_size
from graphprune.pipeline.files import prune_file, report_path
from graphprune.pipeline.segments import SegmentProgress
from graphprune.tensorrt.eligibility import Eligibility, eligibility_report, render_table, summary

ModelArg = Annotated[Path, typer.Argument(help="The ONNX model to read (never modified). Example: model.onnx")]
NmOpt = Annotated[
    str | None,
    typer.Option("--nm", help="N:M pattern along K: at most N non-zeros in every M weights. Example: --nm 2:4"),
]
IncludeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--include",
        help="Only weights whose name or node name matches this shell pattern (repeatable). "
        "Example: --include '*mlp*'",
    ),
]
ExcludeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--exclude",
        help="Leave weights whose name or node name matches this pattern dense (repeatable). "
        "Example: --exclude '*attn*'",
    ),
]
HeadOpt = Annotated[
    bool,
    typer.Option(
        "--include-head",
        help="Also prune the final projection to a model output (LM or classifier head), "
        "which is left dense by default.",
    ),
]


@app.command()
@user_errors
def apply(
    model: ModelArg,
    nm: NmOpt = None,
    sparsity: Annotated[
        float | None,
        typer.Option(help="Unstructured sparsity in [0, 1) instead of N:M. Example: --sparsity 0.5"),
    ] = None,
    scope: Annotated[
        Scope,
        typer.Option(
            help="Which weights an unstructured mask compares: each output neuron (as Wanda), the whole layer "
            "(classic magnitude) or each input channel. Example: --scope layer"
        ),
    ] = Scope.OUTPUT,
    method: Annotated[
        Method | None,
        typer.Option(
            help="Score: magnitude |W|; wanda |W|·‖X‖; sparsegpt (second order, updates the kept weights; "
            "memory: one KxK float64 Gram matrix per distinct input of a group, e.g. 8 MB at K=1024, 128 MB "
            "at K=4096). wanda and sparsegpt need --calib or --stats. Default: wanda with --calib or --stats, "
            "else magnitude. Example: --method sparsegpt"
        ),
    ] = None,
    stats: Annotated[
        Path | None,
        typer.Option(help="Activation statistics saved by `graphprune calibrate`. Example: --stats stats.npz"),
    ] = None,
    calib: CalibOpt = None,
    tokenizer: TokenizerOpt = None,
    seqlen: SeqlenOpt = 512,
    nsamples: NsamplesOpt = 128,
    seed: SeedOpt = 0,
    batch_size: BatchSizeOpt = 8,
    shape: ShapeOpt = None,
    provider: ProviderOpt = "cpu",
    sequential: Annotated[
        bool,
        typer.Option(
            help="Calibrate and prune block by block in dependency order, each block on the activations of the "
            "already pruned blocks, as the Wanda and SparseGPT reference code does (blocks: the graph's "
            "repeating unit of layers); about two inference passes in all. Needs --calib. Example: --sequential"
        ),
    ] = False,
    by_level: Annotated[
        bool,
        typer.Option(
            help="With --sequential, calibrate each level (Q/K/V, then attention output, then MLP in, then MLP "
            "out) on the pruned levels before it, instead of whole blocks (SparseGPT's 'true sequential'). "
            "Example: --sequential --by-level"
        ),
    ] = False,
    percdamp: Annotated[
        float, typer.Option(help="SparseGPT dampening, a fraction of mean(diag XᵀX). Example: --percdamp 0.01")
    ] = 0.01,
    blocksize: Annotated[int, typer.Option(help="SparseGPT column block size. Example: --blocksize 128")] = 128,
    gram_memory: Annotated[
        float,
        typer.Option(
            help="One-shot SparseGPT: GiB of Gram matrices held at once; beyond it the weights are calibrated in "
            "several passes and the matrices spilled to a temporary directory. Example: --gram-memory 8"
        ),
    ] = 4.0,
    max_memory: Annotated[
        str | None,
        typer.Option(
            help="Memory budget of calibration on a model with external data: calibrate segment by segment (each "
            "segment's ONNX Runtime session holds only its own weights, read from the data file), keep the "
            "activations that cross segments in memory within what the budget leaves after the largest segment "
            "and spill the rest to a temporary directory, and write pruned weights into the output as they are "
            "pruned. Without --sequential the statistics are one-shot (dense model). --sequential on such a model "
            "always runs segment by segment. Units: KB/MB/GB (powers of 1000), KiB/MiB/GiB. Example: "
            "--max-memory 8GB"
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Output model path. Default: <stem>.pruned.onnx beside the input"),
    ] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing output.")] = False,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    include_head: HeadOpt = False,
) -> None:
    """Prune a model's matrix weights and write a new model plus a JSON report.

    Example: graphprune apply model.onnx --nm 2:4
    """
    pattern = pattern_from_options(nm, sparsity, scope)
    chosen = method or (Method.WANDA if stats or calib else Method.MAGNITUDE)
    if stats and calib:
        raise GraphpruneError("give --stats (saved statistics) or --calib (data to calibrate on), not both")
    if by_level and not sequential:
        raise GraphpruneError("--by-level is a mode of --sequential: pass both")
    if sequential and not calib:
        raise GraphpruneError("--sequential needs calibration data: pass --calib DATA")
    saved = _load_stats(stats) if stats else None
    request = calibration_request(calib, tokenizer, seqlen, nsamples, seed, batch_size, shape, provider)
    budget = parse_memory_size(max_memory) if max_memory is not None else None
    request = replace(request, gram_memory_gb=gram_memory, max_memory=budget)
    config = PruneConfig(
        pattern, chosen, tuple(include or ()), tuple(exclude or ()), include_head, percdamp, blocksize
    )
    unit = "level" if by_level else "block"

    def on_group(done: int, total: int) -> None:  # the cost: one calibration segment per group
        bar.describe(f"pruning: {unit} {min(done + 1, total)} of {total} calibrated on the pruned ones before it")

    def on_segment(step: SegmentProgress) -> None:
        bar.describe(f"pruning: segment {min(step.done + 1, step.total)} of {step.total}")
        bar.set_detail(segment_detail(step))

    with progress_bar("pruning") as bar:
        written, result = prune_file(
            model,
            config,
            output,
            saved,
            force,
            calibration=request if calib or (chosen is not Method.MAGNITUDE and not stats) else None,
            sequential=("level" if by_level else "block") if sequential else None,
            on_plan=bar.set_total,
            on_weight=lambda name: bar.advance(),
            on_message=lambda text: console.print(f"[yellow]warning:[/yellow] {text}", highlight=False),
            on_group=on_group,
            reads=[stats] if stats else [],
            on_segment=on_segment,
        )
    _print_summary(result, written)


@app.command()
@user_errors
def check(
    model: ModelArg,
    nm: NmOpt = "2:4",
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    include_head: HeadOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the verdict as JSON for pipelines.")] = False,
    eligibility: Annotated[
        bool,
        typer.Option(
            help="Also report, from the ONNX alone, whether TensorRT can run each weight on sparse tensor cores "
            "(2:4 along K, precision, channel counts). Default: on for 2:4. Example: --no-eligibility"
        ),
    ] = True,
) -> None:
    """Verify every target's N:M pattern along its K axis; exit 1 on any violation (a deployment gate).

    The same selection as `apply` (head left out unless --include-head). Example: graphprune check m.onnx --nm 2:4
    """
    pattern = pattern_from_options(nm, None, Scope.OUTPUT)
    assert isinstance(pattern, NMPattern)
    loaded = load_model(model)
    result = CheckPass(pattern, tuple(include or ()), tuple(exclude or ()), include_head)(loaded)
    records = _eligibility(loaded, result) if eligibility and (pattern.keep, pattern.group) == (2, 4) else None
    if as_json:
        verdict = _check_dict(result)
        if records is not None:
            verdict["tensorrt_eligibility"] = [asdict(r) for r in records]
        typer.echo(json.dumps(verdict, indent=1))
    else:
        _print_check(result)
        if records is not None:
            out.print(render_table(records))
            out.print(f"TensorRT sparse eligibility: {summary(records)}", highlight=False)
    if not result.ok:
        raise typer.Exit(1)


def _eligibility(model: ir.Model, result: CheckResult) -> list[Eligibility]:
    checked = {w.name for w in result.weights}
    targets = [t for t in find_targets(model).targets if t.name in checked]
    return eligibility_report(model, targets)


def _load_stats(path: Path) -> ActivationStats:
    if not path.exists():
        raise GraphpruneError(f"{path}: no such statistics file")
    return ActivationStats.load(path)


def _print_summary(result: PruneResult, written: Path) -> None:
    table = Table(title=f"graphprune {result.config.method.value} {result.config.pattern}", show_header=False)
    table.add_row("weights found", str(len(result.weights)))
    table.add_row("pruned", str(len(result.pruned)))
    table.add_row("skipped", str(len(result.skipped)))
    table.add_row("sparsity achieved", f"{result.achieved_sparsity():.2%} of pruned weights")
    table.add_row("model", str(written))
    table.add_row("report", str(report_path(written)))
    out.print(table)
    for weight in result.skipped:
        out.print(f"  skipped {weight.name}: {weight.skipped}", highlight=False)


def _print_check(result: CheckResult) -> None:
    for weight in result.weights:
        mark = "[green]ok[/green]" if weight.ok else "[red]VIOLATION[/red]"
        detail = f" {weight.bad_groups}/{weight.total_groups} bad groups, first at {weight.first_bad}"
        detail = "" if weight.ok else detail
        out.print(f"{mark} {weight.name} (K axis {weight.k_axis}, {weight.sparsity:.1%} zeros){detail}")
    for skip in result.skipped:
        out.print(f"[dim]not checked {skip.name}: {skip.reason}[/dim]")
    verdict = "passes" if result.ok else f"FAILS in {len(result.violations)} weights"
    out.print(f"{result.pattern} check {verdict} ({len(result.weights)} weights checked)")


def _check_dict(result: CheckResult) -> dict:
    return {
        "pattern": str(result.pattern),
        "ok": result.ok,
        "weights": [
            {
                "name": w.name,
                "op": w.op,
                "k_axis": w.k_axis,
                "sparsity": w.sparsity,
                "bad_groups": w.bad_groups,
                "first_bad": w.first_bad,
            }
            for w in result.weights
        ],
        "not_checked": [{"name": s.name, "reason": s.reason} for s in result.skipped],
    }
