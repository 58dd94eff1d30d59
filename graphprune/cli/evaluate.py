"""``graphprune eval``: what pruning cost, measured on held-out data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from graphprune.cli.app import app, out, user_errors
from graphprune.cli.progress import Bar, display
from graphprune.cli.tables import Col, fitted_table


@app.command("eval")
@user_errors
def evaluate(
    dense: Annotated[Path, typer.Argument(help="The dense (original) ONNX model. Example: model.onnx")],
    pruned: Annotated[Path, typer.Argument(help="The pruned ONNX model. Example: model.pruned.onnx")],
    calib: Annotated[
        Path | None,
        typer.Option(
            help="Held-out inputs to compare the outputs on, in a calibration format: an .npz with one array per "
            "model input, a directory of .npz feeds, or a text file with --tokenizer (--windows windows of "
            "--seqlen tokens at seeded random places, default 64). Example: --calib heldout.npz"
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Samples per run for --calib. Example: --batch-size 4")] = 8,
    text: Annotated[
        Path | None,
        typer.Option(help="Held-out text for perplexity (needs --tokenizer). Example: --text heldout.txt"),
    ] = None,
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            help="A Hugging Face tokenizer.json for --text or a text --calib. Example: --tokenizer tokenizer.json"
        ),
    ] = None,
    token_windows: Annotated[
        Path | None,
        typer.Option(
            help="Pre-tokenized windows for perplexity instead of --text: an .npz whose input_ids is (n, L+1). "
            "Example: --token-windows eval.npz"
        ),
    ] = None,
    seqlen: Annotated[int, typer.Option(help="Tokens per perplexity window. Example: --seqlen 512")] = 512,
    windows: Annotated[
        int | None,
        typer.Option(
            help="Perplexity: use only the first N non-overlapping windows; text --calib: draw N windows "
            "(default 64). Example: --windows 32"
        ),
    ] = None,
    offset: Annotated[int, typer.Option(help="Skip this many tokens of --text first. Example: --offset 1000")] = 0,
    bos: Annotated[
        str | None,
        typer.Option(
            help="BOS token put in front of each window. Default: the tokenizer's own (tokenizer_config.json "
            "beside it, or its template), else none. Example: --bos '<s>'"
        ),
    ] = None,
    speed: Annotated[
        int,
        typer.Option(
            help="Also time both models on this CPU with ONNX Runtime: this many interleaved rounds on one random "
            "sample of --seqlen tokens (0: no timing); prints the median times and the speed-up over the dense "
            "model. Example: --speed 10"
        ),
    ] = 0,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print one JSON document on stdout instead of the tables. Example: --json"),
    ] = False,
) -> None:
    """Measure what pruning cost: the pruned model's outputs and perplexity next to the dense model's.

    On --calib data: per output, the cosine similarity of pruned and dense outputs (1 = identical; for an
    encoder, the embeddings), relative L2 error and top-1 agreement of the last axis (for logits). On --text
    or --token-windows: perplexity of both models.

    Example: graphprune eval model.onnx model.pruned.onnx --text heldout.txt --tokenizer tokenizer.json
    """
    from graphprune.errors import GraphpruneError
    from graphprune.evaluate.files import evaluate_files

    if speed < 0:
        raise GraphpruneError(f"--speed {speed}: give a number of timing rounds, or 0 for no timing")
    with display() as shown:
        bars: dict[str, Bar] = {}

        def progress(stage: str, done: int, total: int | None) -> None:
            if stage not in bars:
                bars[stage] = shown.bar(stage, total, unit="samples" if stage.startswith("compar") else "windows")
            bars[stage].update(done, total)

        result = evaluate_files(
            dense, pruned, calib=calib, text=text, token_windows=token_windows, tokenizer=tokenizer,
            batch_size=batch_size, seqlen=seqlen, windows=windows, offset=offset, bos=bos, progress=progress,
        )  # fmt: skip
    report = result.to_dict()
    if speed:
        from graphprune.evaluate.timing import compare_models, synthetic_feed

        report["speed"] = compare_models([dense, pruned], synthetic_feed(dense, seqlen), speed).to_dict()
    if as_json:
        typer.echo(json.dumps(report, indent=1))
    else:
        _print(report)


def _print(report: dict[str, Any]) -> None:
    if "outputs" in report:
        columns = [Col("output"), Col("samples", "right"), Col("cosine", "right"), Col("rel. L2", "right")]
        columns.append(Col("top-1", "right"))
        rows = []
        for row in report["outputs"]:
            top1 = row["top1_agreement"]
            cells = [f"{row['cosine']:.4f}", f"{row['relative_l2']:.4f}", "-" if top1 is None else f"{top1:.2%}"]
            rows.append([row["output"], str(row["samples"]), *cells])
        out.print(fitted_table(out, columns, rows, title="outputs, pruned vs dense (cosine 1 = identical)"))
    if "perplexity_dense" in report:
        count, length = report["windows"]
        rows = [
            ["dense", f"{report['perplexity_dense']:.3f}"],
            ["pruned", f"{report['perplexity_pruned']:.3f}"],
        ]
        title = f"perplexity on {count} windows of {length} tokens (BOS: {report['bos']})"
        out.print(fitted_table(out, [Col("model"), Col("perplexity", "right")], rows, title=title))
    if "speed" in report:
        timed = report["speed"]
        rows = [
            [name, f"{row['wall_s'] * 1000:.1f}", f"{row['cpu_s'] * 1000:.1f}", f"{row['speedup']:.2f}x"]
            for name, row in zip(("dense", "pruned"), timed["models"], strict=True)
        ]
        columns = [Col("model"), Col("ms / run", "right"), Col("CPU ms", "right"), Col("speed-up", "right")]
        title = f"speed on this CPU (ONNX Runtime, median of {timed['rounds']} interleaved rounds)"
        out.print(fitted_table(out, columns, rows, title=title))
