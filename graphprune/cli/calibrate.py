"""``graphprune calibrate``: collect activation statistics once, reuse them for any number of prunes."""

from __future__ import annotations

from pathlib import Path

import typer

from graphprune.cli.app import app, console, user_errors

MAX_WARNINGS_SHOWN = 12


@app.command("calibrate")
@user_errors
def calibrate_command(
    model: Path = typer.Argument(..., help="ONNX model to calibrate, e.g. model.onnx (external data is fine)."),
    output: Path = typer.Option(
        ..., "--output", "-o", help="Where to write the statistics, e.g. -o stats.npz (reuse with apply --stats)."
    ),
    calib: str | None = typer.Option(
        None,
        "--calib",
        help="Calibration data: an .npz with one array per model input (batch along axis 0), e.g. --calib "
        "calib.npz; a directory of .npz files, one feed each; or a text file with --tokenizer, e.g. --calib "
        "corpus.txt. Without it, random inputs are synthesised from the model's signature (worse masks).",
    ),
    tokenizer: Path | None = typer.Option(
        None, "--tokenizer", help="tokenizer.json for text data, e.g. --tokenizer tokenizer.json."
    ),
    seqlen: int = typer.Option(512, "--seqlen", help="Tokens per text window, e.g. --seqlen 512."),
    nsamples: int = typer.Option(
        128, "--nsamples", help="Text windows (or synthetic samples) to draw, e.g. --nsamples 128."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for the text windows and synthetic inputs, e.g. --seed 0."),
    batch_size: int = typer.Option(
        8, "--batch-size", help="Samples per ONNX Runtime run (.npz and text data), e.g. --batch-size 8."
    ),
    shape: list[str] = typer.Option(
        [],
        "--shape",
        help="Shape of a model input with dynamic dimensions, for synthetic data; repeat per input, e.g. "
        "--shape input_ids=1x128 --shape attention_mask=1x128.",
    ),
    provider: str = typer.Option(
        "cpu",
        "--provider",
        help="ONNX Runtime execution provider, e.g. --provider cuda (needs the onnxruntime-gpu wheel: "
        "pip install 'graphprune\\[gpu]' instead of '\\[cpu]'); any name onnxruntime lists also works.",
    ),
    optimize: bool = typer.Option(
        False,
        "--optimize",
        help="Let ONNX Runtime optimise the tapped graph (faster; off by default so that the graph runs as "
        "written). The statistics are the same up to float rounding.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Run MODEL over calibration data in ONNX Runtime and save Σx² per input channel of every prunable weight.

    Example:

        graphprune calibrate model.onnx --calib corpus.txt --tokenizer tokenizer.json -o stats.npz
    """
    from graphprune.calibration import calibrate
    from graphprune.calibration.synthetic import parse_shape

    shapes = dict(parse_shape(s) for s in shape)
    stats = calibrate(
        model,
        calib,
        provider=provider,
        batch_size=batch_size,
        tokenizer=tokenizer,
        seqlen=seqlen,
        nsamples=nsamples,
        seed=seed,
        shapes=shapes,
        optimize=optimize,
        progress=not quiet,
    )
    for w in stats.warnings[:MAX_WARNINGS_SHOWN]:
        console.print(f"[yellow]warning:[/yellow] {w}", highlight=False, soft_wrap=True)
    if len(stats.warnings) > MAX_WARNINGS_SHOWN:
        console.print(
            f"[yellow]warning:[/yellow] … and {len(stats.warnings) - MAX_WARNINGS_SHOWN} more, "
            "kept in the statistics file",
            highlight=False,
        )
    written = stats.save(output)
    rows = max(stats.rows.values(), default=0)
    console.print(f"statistics for {len(stats.sumsq)} weights ({rows} rows at most) written to {written}")
