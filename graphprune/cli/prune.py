"""``graphprune apply`` and ``graphprune check``."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated

import onnx_ir as ir
import typer

from graphprune.algorithms.pattern import NMPattern, Scope
from graphprune.algorithms.quant_grid import QuantGrid
from graphprune.algorithms.scores import Method
from graphprune.calibration.stats import ActivationStats
from graphprune.cli.app import app, out, user_errors
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
from graphprune.cli.progress import PruningDisplay, display
from graphprune.cli.tables import Col, fitted_table
from graphprune.errors import GraphpruneError
from graphprune.graph.model_io import load_model
from graphprune.graph.targets import find_targets
from graphprune.passes.check import CheckPass, CheckResult
from graphprune.passes.prune import PruneConfig, PruneResult
from graphprune.pipeline.boundary import parse_memory_size
from graphprune.pipeline.files import prune_file, report_path
from graphprune.pipeline.sequential import SequentialUnit
from graphprune.tensorrt.eligibility import Eligibility, eligibility_report, summary

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
JsonOpt = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print one JSON document on stdout instead of the table (progress and warnings stay on stderr). "
        "Example: --json",
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
            "at K=4096); alps (ADMM on the same Gram matrices, then a least-squares refit of the kept weights: "
            "lower error than sparsegpt, a few times its time). sparsegpt and alps run on a CUDA GPU through "
            "PyTorch when both are present. wanda, sparsegpt and alps need --calib or --stats (alps and "
            "sparsegpt: saved with --gram). "
            "Default: wanda with --calib or --stats, else magnitude. Example: --method alps"
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
    batch_size: BatchSizeOpt = 1,
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
        float,
        typer.Option(
            help="SparseGPT and ALPS dampening, a fraction of mean(diag XᵀX). 0.01 is the reference's; more fits "
            "the calibration text less closely and carries better to other text (SmolLM2 2:4 ALPS: 0.15, chosen "
            "on held-out genres of the calibration text, README). Example: --percdamp 0.15"
        ),
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
            help="Memory budget, for a model whose weights are in external data files. With --calib: calibrate "
            "segment by segment (each segment's ONNX Runtime session holds only its own weights, read from the "
            "data file), keep the activations that cross segments in memory within what the budget leaves after "
            "the largest segment and spill the rest to a temporary directory, and write pruned weights into the "
            "output as they are pruned; without --sequential the statistics are one-shot (dense model). "
            "--sequential on such a model always runs segment by segment. Magnitude and --stats runs stream the "
            "weights one at a time anyway; an error if the statistics and the largest weight exceed the budget. "
            "A model with inline weights loads whole: a warning that the budget is not enforced, or an error "
            "when its weights alone exceed it. Units: KB/MB/GB (powers of 1000), KiB/MiB/GiB. Example: "
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
    as_json: JsonOpt = False,
    quantize: Annotated[
        str | None,
        typer.Option(
            help="sparsegpt and alps: prune and quantize the weights jointly (symmetric, zero point 0, so the "
            "pattern survives): sparsegpt rounds each column's kept weights as it fixes them and spreads the "
            "error over the columns after it (the SparseGPT paper's joint mode); alps rounds after its solve, "
            "by GPTQ under its mask on the same Gram matrices. Writes a Q/DQ model with the solver's own codes "
            "and scales (DequantizeLinear gives its weights exactly, no second rounding): int8 and fp8 (E4M3) "
            "one scale per output channel, with activation Q/DQ calibrated on --calib after pruning (W8A8, "
            "TensorRT's symmetric grid); int4 weight-only, blocks of --quant-block-size along K. The LM head and "
            "tables a Gather reads stay float, as in `quantize`. Not with --max-memory or --sequential on a model "
            "with external data. Example: --quantize int4"
        ),
    ] = None,
    quant_block_size: Annotated[
        int | None,
        typer.Option(
            help="With --quantize int4: weights per scale along K, 32, 64 or 128 (default 128); int8 and fp8 "
            "take one scale per output channel. Example: --quant-block-size 64"
        ),
    ] = None,
    permute: Annotated[
        bool,
        typer.Option(
            help="N:M only: before pruning a weight, reorder its input channels where the graph absorbs the "
            "order exactly (an MLP's intermediate channels: gate/up output columns with down's K rows, fc1 "
            "columns and bias with fc2's K rows; the channels inside each attention head: V's output with O's "
            "K rows), choosing the order that keeps the most importance under the mask. The dense model "
            "computes the same function. Works one-shot and with --sequential. A table (and --json, and the "
            "report) lists each group with the share of the importance kept before and after. Example: --nm 2:4 "
            "--permute"
        ),
    ] = False,
    target: Annotated[
        str,
        typer.Option(
            help="What sparsegpt and alps reconstruct: 'pruned', each layer's output on the pruned model's own "
            "inputs (as the reference), or 'dense', the dense model's output on the same windows from the pruned "
            "model's inputs (needs --sequential: a second, dense stream runs beside the pruned one and a cross-"
            "Gram matrix is collected per input, the same size as the Gram matrix). Example: --target dense"
        ),
    ] = "pruned",
    target_blend: Annotated[
        float,
        typer.Option(
            help="With --target dense: the share of the dense model's outputs in the target, from 0 (the pruned "
            "model's own outputs, as --target pruned) to 1 (all of the dense outputs, the default); each layer "
            "minimises blend x its error to the dense outputs + (1 - blend) x its error to its own outputs, "
            "solved exactly from the same Gram and cross-Gram matrices. Aiming all the way at the dense outputs "
            "can shrink what the layers pass on; a blend tempers that. Example: --target dense --target-blend 0.5"
        ),
    ] = 1.0,
    swaps: Annotated[
        int,
        typer.Option(
            help="sparsegpt and alps: after the solver, refine the mask by exchanging a kept and a pruned weight "
            "inside an N:M group (or a row, unstructured) while the layer's exact reconstruction error falls, "
            "re-solving the kept weights; at most this many swaps per output row (0: none). Example: --swaps 50"
        ),
    ] = 0,
) -> None:
    """Prune a model's weights (2:4 by default) and write a new model plus a JSON report.

    Example: graphprune apply model.onnx --nm 2:4 --calib corpus.txt --tokenizer tokenizer.json
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
    if permute and not isinstance(pattern, NMPattern):
        raise GraphpruneError("--permute reorders channels for N:M groups: give --nm (for example --nm 2:4)")
    if target == "dense" and not sequential:
        raise GraphpruneError("--target dense needs --sequential (it reconstructs the dense model's outputs)")
    config = PruneConfig(
        pattern,
        method=chosen,
        include=tuple(include or ()),
        exclude=tuple(exclude or ()),
        include_head=include_head,
        percdamp=percdamp,
        blocksize=blocksize,
        permute=permute,
        quantize=_quantize_grid(quantize, quant_block_size),
        target=target,
        target_blend=target_blend,
        swaps=swaps,
    )
    unit: SequentialUnit = "level" if by_level else "block"

    with display() as shown:
        written, result = prune_file(
            model,
            config,
            output,
            stats=saved,
            calibration=request if calib or (chosen is not Method.MAGNITUDE and not stats) else None,
            sequential=unit if sequential else None,
            max_memory=budget,
            force=force,
            reads=[stats] if stats else [],
            progress=PruningDisplay(shown, unit),
        )
    if as_json:
        typer.echo(json.dumps(_apply_dict(result, written), indent=1))
    else:
        _print_summary(result, written)


@app.command()
@user_errors
def check(
    model: ModelArg,
    nm: NmOpt = "2:4",
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    include_head: HeadOpt = False,
    as_json: JsonOpt = False,
    eligibility: Annotated[
        bool,
        typer.Option(
            help="Also report, from the ONNX alone, whether TensorRT can run each weight on sparse tensor cores "
            "(2:4 along K, precision, channel counts). Default: on for 2:4. Example: --no-eligibility"
        ),
    ] = True,
) -> None:
    """Verify every weight's N:M pattern along K and TensorRT's sparse eligibility; exit 1 on a violation.

    The same selection as `apply` (head left out unless --include-head); a deployment gate.

    Example: graphprune check model.pruned.onnx --nm 2:4
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
        _print_check(result, records)
    if not result.ok:
        raise typer.Exit(1)


def _eligibility(model: ir.Model, result: CheckResult) -> list[Eligibility]:
    checked = {w.name for w in result.weights}
    targets = [t for t in find_targets(model).targets if t.name in checked]
    return eligibility_report(model, targets)


def _quantize_grid(precision: str | None, block_size: int | None) -> QuantGrid | None:
    """--quantize and --quant-block-size as a grid: int4 in blocks of 128 along K by default, else per channel."""
    if precision is None:
        if block_size is not None:
            raise GraphpruneError("--quant-block-size needs --quantize (for example --quantize int4)")
        return None
    if precision not in ("int8", "int4", "fp8"):
        raise GraphpruneError(f"--quantize must be int8, int4 or fp8, got {precision!r}")
    if block_size is not None and block_size < 1:
        raise GraphpruneError(f"--quant-block-size must be at least 1, got {block_size}")
    if block_size is None and precision == "int4":
        block_size = 128
    return QuantGrid(precision=precision, block_size=block_size)  # type: ignore[arg-type]  # a str checked above


def _load_stats(path: Path) -> ActivationStats:
    if not path.exists():
        raise GraphpruneError(f"{path}: no such statistics file")
    return ActivationStats.load(path)


def _apply_dict(result: PruneResult, written: Path) -> dict:
    """What the summary table shows, plus each skipped weight's reason."""
    return {
        "method": result.config.method.value,
        "pattern": str(result.config.pattern),
        "weights_found": len(result.weights),
        "pruned": len(result.pruned),
        "skipped": [{"name": w.name, "reason": w.skipped} for w in result.skipped],
        "sparsity_achieved": result.achieved_sparsity(),
        **_permutation_summary(result),
        "quantize": result.config.quantize.to_dict() if result.config.quantize else None,
        **_qdq_summary(result),
        "model": str(written),
        "report": str(report_path(written)),
    }


def _qdq_summary(result: PruneResult) -> dict:
    """The joint mode's Q/DQ step: weights written with the solver's codes, activations quantized, weights kept
    float (each with its reason)."""
    if result.qdq is None:
        return {}
    kept = [{"name": k["name"], "reason": k["reason"]} for k in result.qdq["kept_float"]]
    return {
        "qdq": {
            "weights": len(result.qdq["weights"]),
            "activations": len(result.qdq["activations"]),
            "kept_float": kept,
        }
    }


def _permutation_summary(result: PruneResult) -> dict:
    """Each channel group --permute searched (reader, kind, importance kept before and after, the share of the
    lost importance recovered, whether the order was written) and the mean share recovered by those written."""
    if not result.config.permute:
        return {}
    searched = [w.permutation for w in result.weights if w.permutation]
    written = [p for p in searched if p["written"]]
    recovered = sum(p["recovered"] for p in written) / len(written) if written else 0.0
    return {"permuted_groups": searched, "permutation_recovered": recovered}


def _print_summary(result: PruneResult, written: Path) -> None:
    summary = _apply_dict(result, written)
    rows = [
        ["weights found", str(summary["weights_found"])],
        ["pruned", str(summary["pruned"])],
        ["skipped", str(len(result.skipped))],
        ["sparsity achieved", f"{summary['sparsity_achieved']:.2%} of pruned weights"],
    ]
    if result.config.quantize is not None:
        grid = result.config.quantize
        blocks = f"blocks of {grid.block_size} along K" if grid.block_size else "per output channel"
        rows.append(["quantized", f"{grid.precision}, {blocks}"])
        qdq = summary["qdq"]
        acts = f"{qdq['activations']} activations" if qdq["activations"] else "weight-only"
        text = f"{qdq['weights']} weights (the solver's codes), {acts}, {len(qdq['kept_float'])} float"
        rows.append(["Q/DQ", text])
    if result.config.permute:
        groups = summary["permuted_groups"]
        written = sum(g["written"] for g in groups)
        text = f"{written} of {len(groups)} (mean {summary['permutation_recovered']:.1%} of the loss recovered)"
        rows.append(["permuted groups", text])
    rows += [["model", summary["model"]], ["report", summary["report"]]]
    title = f"graphprune {summary['method']} {summary['pattern']}"
    out.print(fitted_table(out, [Col(""), Col("")], rows, flex=1, title=title, show_header=False))
    if summary.get("permuted_groups"):
        _print_permutations(summary["permuted_groups"])
    for weight in result.skipped:
        out.print(f"  skipped {weight.name}: {weight.skipped}", highlight=False)
    for kept in summary.get("qdq", {}).get("kept_float", []):
        out.print(f"  kept float {kept['name']}: {kept['reason']}", highlight=False)


def _print_permutations(groups: list[dict]) -> None:
    """One row per channel group: its reader, the share of the importance the N:M mask keeps in the original
    and the chosen order, and the share of what the original order loses that the new one recovers."""
    columns = [Col("channels read by"), Col("kind"), Col("kept before", "right"), Col("kept after", "right")]
    columns.append(Col("recovered", "right"))
    rows = []
    for g in groups:
        kind = "mlp" if g["kind"] == "mlp channels" else f"heads of {g['period']}"
        after = f"{g['kept_after']:.1%}" if g["written"] else "(kept order)"
        rows.append([g["reader"], kind, f"{g['kept_before']:.1%}", after, f"{g['recovered']:.1%}"])
    out.print(fitted_table(out, columns, rows, title="channel permutations (share of the importance)"))


_STATUS = {"eligible": "[green]eligible[/green]", "too small to gain": "[yellow]too small[/yellow]"}


def _print_check(result: CheckResult, records: list[Eligibility] | None) -> None:
    """One row per weight: its zeros, the N:M verdict and, for 2:4, TensorRT's; reasons below the table."""
    by_name = {r.name: r for r in records or []}
    several_ops = len({w.op for w in result.weights}) > 1  # one op for all (MatMul) says nothing: room for names
    columns = [Col("weight"), *([Col("op")] if several_ops else [])]
    columns += [Col("out x K", "right"), Col("zeros", "right"), Col(str(result.pattern))]
    if records is not None:
        columns += [Col("precision"), Col("TensorRT")]
    rows = []
    for w in result.weights:
        verdict = "[green]ok[/green]" if w.ok else f"[red]{w.bad_groups}/{w.total_groups} bad[/red]"
        record = by_name.get(w.name)
        shape = f"{record.out_channels} x {record.k}" if record else "-"
        row = [w.name, *([w.op] if several_ops else []), shape, f"{w.sparsity:.1%}", verdict]
        if records is not None:
            row += (
                [record.precision, _STATUS.get(record.status, "[red]ineligible[/red]")] if record else ["-", "-"]
            )
        rows.append(row)
    out.print(fitted_table(out, columns, rows))
    for skip in result.skipped:
        out.print(f"[dim]not checked {skip.name}: {skip.reason}[/dim]", highlight=False)
    _print_reasons(records or [])
    verdict = "passes" if result.ok else f"[red]FAILS[/red] in {len(result.violations)} weights"
    if not result.weights:  # nothing verified proves nothing
        verdict = "[red]FAILS[/red]: no weight could be read"
    out.print(f"{result.pattern} check {verdict} ({len(result.weights)} weights checked)", highlight=False)
    if records is not None:
        out.print(f"TensorRT sparse eligibility: {summary(records)}", highlight=False)


def _print_reasons(records: list[Eligibility]) -> None:
    """Why weights are not eligible, one line per kind of reason (the text before its first ": "), the full
    text when every weight of the kind has the same one; --json has each weight's own."""
    kinds: dict[str, list[str]] = {}
    for record in records:
        for reason in record.reasons:
            kinds.setdefault(reason.split(": ")[0], []).append(reason)
    for kind, texts in kinds.items():
        text = texts[0] if len(set(texts)) == 1 else f"{kind} (per weight in --json)"
        count = f"{len(texts)} weight{'s' if len(texts) > 1 else ''}"
        out.print(f"[yellow]TensorRT[/yellow], {count}: {text}", highlight=False)


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
