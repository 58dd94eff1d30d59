"""``graphprune calibrate``: collect activation statistics once, reuse them for any number of prunes."""

from __future__ import annotations

import json
from dataclasses import replace
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
from graphprune.cli.progress import display
from graphprune.cli.tables import Col, fitted_table

MAX_WARNINGS_SHOWN = 12


@app.command("calibrate")
@user_errors
def calibrate_command(
    model: Annotated[
        Path, typer.Argument(help="ONNX model to calibrate, e.g. model.onnx (external data is fine).")
    ],
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="Where to write the statistics, e.g. -o stats.npz (apply --stats)."),
    ],
    calib: CalibOpt = None,
    tokenizer: TokenizerOpt = None,
    seqlen: SeqlenOpt = 512,
    nsamples: NsamplesOpt = 128,
    seed: SeedOpt = 0,
    batch_size: BatchSizeOpt = 1,
    shape: ShapeOpt = None,
    provider: ProviderOpt = "cpu",
    gram: Annotated[
        bool,
        typer.Option(
            "--gram",
            help="Also collect the Gram matrices XᵀX that `apply --method sparsegpt|alps --stats` needs: one KxK "
            "float64 matrix per distinct input (8 MB at K=1024, 128 MB at K=4096), all in memory, e.g. --gram.",
        ),
    ] = False,
    optimize: Annotated[
        bool,
        typer.Option(
            "--optimize",
            help="Let ONNX Runtime optimise the tapped graph (faster; off by default so that the graph runs as "
            "written). The statistics are the same up to float rounding.",
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, e.g. -q.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing statistics, e.g. --force.")] = False,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print one JSON document on stdout instead of the table, e.g. --json."),
    ] = False,
) -> None:
    """Measure activations once (Σx² per input channel of every weight) and save them for any number of prunes.

    Example:

        graphprune calibrate model.onnx --calib corpus.txt --tokenizer tokenizer.json -o stats.npz
    """
    from graphprune.pipeline.calibrate_file import calibrate_file

    request = calibration_request(calib, tokenizer, seqlen, nsamples, seed, batch_size, shape, provider)
    request = replace(request, gram=gram, optimize=optimize)
    with display(enabled=not quiet) as shown:
        bar = shown.bar("calibrating", unit="samples")
        written, stats = calibrate_file(model, output, request, force=force, progress=bar.update)
    for w in stats.warnings[:MAX_WARNINGS_SHOWN]:
        console.print(f"[yellow]warning:[/yellow] {w}", highlight=False, soft_wrap=True)
    if len(stats.warnings) > MAX_WARNINGS_SHOWN:
        console.print(
            f"[yellow]warning:[/yellow] … and {len(stats.warnings) - MAX_WARNINGS_SHOWN} more, "
            "kept in the statistics file",
            highlight=False,
        )
    weights = [
        {"name": name, "k": int(values.shape[0]), "rows": int(stats.rows[name]), "gram": name in stats.gram}
        for name, values in stats.sumsq.items()
    ]
    if as_json:
        document = {"statistics": str(written), "weights": weights, "warnings": list(stats.warnings)}
        typer.echo(json.dumps(document, indent=1))
        return
    rows = [[str(w["name"]), str(w["k"]), str(w["rows"]), "yes" if w["gram"] else "no"] for w in weights]
    columns = [Col("weight"), Col("K", "right"), Col("rows", "right"), Col("Gram")]
    out.print(fitted_table(out, columns, rows))
    out.print(f"statistics for {len(weights)} weights written to {written}", highlight=False)
