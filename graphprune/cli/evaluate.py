"""``graphprune eval``: what pruning cost, measured on held-out data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.table import Table

from graphprune.cli.app import app, out, user_errors
from graphprune.cli.progress import progress_bar
from graphprune.errors import GraphpruneError


@app.command("eval")
@user_errors
def evaluate(
    dense: Annotated[Path, typer.Argument(help="The dense (original) ONNX model. Example: model.onnx")],
    pruned: Annotated[Path, typer.Argument(help="The pruned ONNX model. Example: model.pruned.onnx")],
    calib: Annotated[
        Path | None,
        typer.Option(
            help="Held-out inputs, in a calibration format: an .npz with one array per model input, or a "
            "directory of .npz feeds. Example: --calib heldout.npz"
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Samples per run for --calib. Example: --batch-size 4")] = 8,
    text: Annotated[
        Path | None,
        typer.Option(help="Held-out text for perplexity (needs --tokenizer). Example: --text heldout.txt"),
    ] = None,
    tokenizer: Annotated[
        Path | None,
        typer.Option(help="A Hugging Face tokenizer.json for --text. Example: --tokenizer tokenizer.json"),
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
        int | None, typer.Option(help="Use only the first N non-overlapping windows. Example: --windows 32")
    ] = None,
    offset: Annotated[int, typer.Option(help="Skip this many tokens of --text first. Example: --offset 1000")] = 0,
    bos: Annotated[
        str | None,
        typer.Option(
            help="BOS token put in front of each window. Default: the tokenizer's own (tokenizer_config.json "
            "beside it, or its template), else none. Example: --bos '<s>'"
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON for pipelines.")] = False,
) -> None:
    """Compare a pruned model with its dense original: per output cosine similarity, relative L2 error and
    top-1 agreement of the last axis (for logits) on --calib data, and perplexity of both on --text.

    Example: graphprune eval model.onnx model.pruned.onnx --text heldout.txt --tokenizer tokenizer.json
    """
    from graphprune.evaluate.perplexity import perplexity

    if calib is None and text is None and token_windows is None:
        raise GraphpruneError("nothing to evaluate on: pass --calib DATA, --text FILE or --token-windows FILE")
    for path in (dense, pruned):
        if not path.is_file():
            raise GraphpruneError(f"{path}: no such model file")
    report: dict[str, Any] = {"dense": str(dense), "pruned": str(pruned)}
    if calib is not None:
        report["outputs"] = _compare(dense, pruned, calib, batch_size)
    if text is not None or token_windows is not None:
        ids, report["bos"] = _windows(text, tokenizer, token_windows, seqlen, windows, offset, bos)
        report["windows"] = list(ids.shape)
        for name, model in (("dense", dense), ("pruned", pruned)):
            with progress_bar(f"perplexity ({name})", ids.shape[0]) as bar:
                report[f"perplexity_{name}"] = perplexity(model, ids, progress=lambda done, total: bar.advance())
    if as_json:
        typer.echo(json.dumps(report, indent=1))
    else:
        _print(report)


def _compare(dense: Path, pruned: Path, calib: Path, batch_size: int) -> list[dict[str, object]]:
    import onnx_ir as ir

    from graphprune.calibration.data import open_source
    from graphprune.calibration.signature import model_inputs, validate_feed
    from graphprune.evaluate.compare import check_comparable, compare_outputs
    from graphprune.evaluate.perplexity import open_session
    from graphprune.graph.model_io import load_model

    model = ir.to_proto(load_model(dense))  # graph and signature only: external weights stay in their files
    specs = model_inputs(model)
    source = open_source(calib, model, specs, batch_size=batch_size)
    sessions = [open_session(p) for p in (dense, pruned)]
    check_comparable(*sessions)
    names = [o.name for o in sessions[0].get_outputs()]

    def runner(session: Any) -> Any:
        def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            try:
                return dict(zip(names, session.run(names, dict(feed)), strict=True))
            except Exception as exc:  # onnxruntime's own types: data the model cannot run on
                reason = str(exc).splitlines()[0]
                raise GraphpruneError(f"onnxruntime cannot run the model on --calib: {reason}") from None

        return run

    with progress_bar("comparing outputs", source.total) as bar:
        feeds = (validate_feed(feed, specs, label) for label, feed in source)
        results = compare_outputs(runner(sessions[0]), runner(sessions[1]), feeds, on_batch=bar.advance)
    return [r.to_dict() for r in results]


def _windows(
    text: Path | None,
    tokenizer: Path | None,
    token_windows: Path | None,
    seqlen: int,
    count: int | None,
    offset: int,
    bos: str | None,
) -> tuple[np.ndarray, str | None]:
    from graphprune.evaluate.perplexity import find_bos, text_windows

    if token_windows is not None:
        from graphprune.evaluate.perplexity import load_token_windows

        return load_token_windows(token_windows, count), "as given in the windows file"
    assert text is not None
    if tokenizer is None:
        raise GraphpruneError("--text needs --tokenizer tokenizer.json")
    for path in (text, tokenizer):
        if not path.is_file():
            raise GraphpruneError(f"{path}: no such file")
    from tokenizers import Tokenizer

    found = find_bos(tokenizer, bos)
    encoded = Tokenizer.from_file(str(tokenizer)).encode(text.read_text(), add_special_tokens=False)
    ids = text_windows(np.array(encoded.ids), seqlen, count, offset, found[0] if found else None)
    return ids, f"{found[1]} (id {found[0]})" if found else "none"


def _print(report: dict[str, Any]) -> None:
    if "outputs" in report:
        table = Table(title="outputs, pruned vs dense")
        for column in ("output", "samples", "cosine", "relative L2", "top-1 agreement"):
            table.add_column(column)
        for row in report["outputs"]:
            top1 = row["top1_agreement"]
            cells = [f"{row['cosine']:.4f}", f"{row['relative_l2']:.4f}", "-" if top1 is None else f"{top1:.2%}"]
            table.add_row(row["output"], str(row["samples"]), *cells)
        out.print(table)
    if "perplexity_dense" in report:
        count, length = report["windows"]
        out.print(
            f"perplexity on {count} windows of {length} tokens (BOS: {report['bos']}): "
            f"dense {report['perplexity_dense']:.3f}, pruned {report['perplexity_pruned']:.3f}",
            highlight=False,
        )
