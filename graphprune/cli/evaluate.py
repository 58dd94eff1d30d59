"""``graphprune eval``: what pruning cost, measured on held-out data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from graphprune.cli.app import app, out, user_errors
from graphprune.cli.progress import Display, display
from graphprune.cli.tables import Col, fitted_table
from graphprune.errors import GraphpruneError

DEFAULT_TEXT_WINDOWS = 64


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
    from graphprune.evaluate.perplexity import perplexity

    if calib is None and text is None and token_windows is None:
        raise GraphpruneError("nothing to evaluate on: pass --calib DATA, --text FILE or --token-windows FILE")
    for path in (dense, pruned):
        if not path.is_file():
            raise GraphpruneError(f"{path}: no such model file")
    report: dict[str, Any] = {"dense": str(dense), "pruned": str(pruned)}
    with display() as shown:
        if calib is not None:
            report["outputs"] = _compare(shown, dense, pruned, calib, batch_size, tokenizer, seqlen, windows)
        if text is not None or token_windows is not None:
            ids, report["bos"] = _windows(text, tokenizer, token_windows, seqlen, windows, offset, bos)
            report["windows"] = list(ids.shape)
            for name, model in (("dense", dense), ("pruned", pruned)):
                bar = shown.bar(f"perplexity ({name})", ids.shape[0], unit="windows")
                report[f"perplexity_{name}"] = perplexity(model, ids, progress=bar.update)
    if as_json:
        typer.echo(json.dumps(report, indent=1))
    else:
        _print(report)


def _compare(
    shown: Display,
    dense: Path,
    pruned: Path,
    calib: Path,
    batch_size: int,
    tokenizer: Path | None,
    seqlen: int,
    windows: int | None,
) -> list[dict[str, object]]:
    import onnx_ir as ir

    from graphprune.calibration.data import open_source
    from graphprune.calibration.signature import model_inputs, validate_feed
    from graphprune.evaluate.compare import check_comparable, compare_outputs
    from graphprune.evaluate.perplexity import open_session
    from graphprune.graph.model_io import load_model

    model = ir.to_proto(load_model(dense))  # graph and signature only: external weights stay in their files
    specs = model_inputs(model)
    source = open_source(
        calib,
        model,
        specs,
        batch_size=batch_size,
        tokenizer=tokenizer,
        seqlen=seqlen,
        nsamples=windows or DEFAULT_TEXT_WINDOWS,
    )
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

    bar = shown.bar("comparing outputs", source.total, unit="samples")
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
    tok = Tokenizer.from_file(str(tokenizer))
    tok.no_truncation()  # a tokenizer.json made for sentences would cut the text short
    encoded = tok.encode(text.read_text(), add_special_tokens=False)
    ids = text_windows(np.array(encoded.ids), seqlen, count, offset, found[0] if found else None)
    return ids, f"{found[1]} (id {found[0]})" if found else "none"


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
