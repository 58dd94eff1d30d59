"""The library call behind ``graphprune eval``: what pruning cost, a dense and a pruned file side by side."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from graphprune.errors import GraphpruneError
from graphprune.evaluate.compare import OutputComparison

DEFAULT_TEXT_WINDOWS = 64
# (stage, done, total): "comparing outputs" counts samples, "perplexity (dense|pruned)" windows
Progress = Callable[[str, int, int | None], None]  # total: None when not known in advance


@dataclass(frozen=True, kw_only=True)
class Evaluation:
    """Per-output agreement on ``calib`` data and/or both models' perplexity on text windows."""

    dense: Path
    pruned: Path
    outputs: list[OutputComparison] | None = None
    windows: tuple[int, int] | None = None  # (count, tokens per window) of the perplexity windows
    bos: str | None = None  # the BOS token put in front of each window, as found
    perplexity_dense: float | None = None
    perplexity_pruned: float | None = None

    def to_dict(self) -> dict[str, Any]:
        report: dict[str, Any] = {"dense": str(self.dense), "pruned": str(self.pruned)}
        if self.outputs is not None:
            report["outputs"] = [r.to_dict() for r in self.outputs]
        if self.windows is not None:
            report |= {"bos": self.bos, "windows": list(self.windows)}
            report |= {"perplexity_dense": self.perplexity_dense, "perplexity_pruned": self.perplexity_pruned}
        return report


def evaluate_files(
    dense: str | Path,
    pruned: str | Path,
    *,
    calib: str | Path | None = None,
    text: str | Path | None = None,
    token_windows: str | Path | None = None,
    tokenizer: str | Path | None = None,
    batch_size: int = 8,
    seqlen: int = 512,
    windows: int | None = None,
    offset: int = 0,
    bos: str | None = None,
    progress: Progress | None = None,
) -> Evaluation:
    """Compare ``pruned`` with ``dense``: their outputs on ``calib`` (an .npz, a directory of them, or a text file
    with ``tokenizer``: ``windows`` windows of ``seqlen`` tokens, default 64), and/or their perplexity on ``text``
    (with ``tokenizer``) or pre-tokenized ``token_windows``. Nothing is written."""
    from graphprune.evaluate.perplexity import perplexity

    if calib is None and text is None and token_windows is None:
        raise GraphpruneError("nothing to evaluate on: give `calib` data, `text` or `token_windows`")
    dense, pruned = Path(dense), Path(pruned)
    for path in (dense, pruned):
        if not path.is_file():
            raise GraphpruneError(f"{path}: no such model file")
    report = progress or (lambda stage, done, total: None)
    outputs = None
    if calib is not None:
        outputs = compare_files(
            dense, pruned, Path(calib), batch_size=batch_size, tokenizer=tokenizer, seqlen=seqlen,
            samples=windows, progress=report,
        )  # fmt: skip
    if text is None and token_windows is None:
        return Evaluation(dense=dense, pruned=pruned, outputs=outputs)
    ids, found = perplexity_windows(text, tokenizer, token_windows, seqlen, windows, offset, bos)
    scores = {}
    for name, model in (("dense", dense), ("pruned", pruned)):
        stage = f"perplexity ({name})"
        scores[name] = perplexity(model, ids, progress=partial(report, stage))
    shape = (int(ids.shape[0]), int(ids.shape[1]))
    return Evaluation(
        dense=dense,
        pruned=pruned,
        outputs=outputs,
        windows=shape,
        bos=found,
        perplexity_dense=scores["dense"],
        perplexity_pruned=scores["pruned"],
    )


def compare_files(
    dense: Path,
    pruned: Path,
    calib: Path,
    *,
    batch_size: int = 8,
    tokenizer: str | Path | None = None,
    seqlen: int = 512,
    samples: int | None = None,
    progress: Progress | None = None,
) -> list[OutputComparison]:
    """Run both models on the same ``calib`` batches; per float output, cosine, relative L2 and top-1 agreement."""
    import onnx_ir as ir

    from graphprune.calibration.data import open_source
    from graphprune.calibration.signature import model_inputs, validate_feed
    from graphprune.evaluate.compare import check_comparable, compare_outputs
    from graphprune.evaluate.perplexity import open_session
    from graphprune.graph.model_io import load_model

    model = ir.to_proto(load_model(dense))  # graph and signature only: external weights stay in their files
    specs = model_inputs(model)
    source = open_source(
        calib, model, specs, batch_size=batch_size, tokenizer=tokenizer, seqlen=seqlen,
        nsamples=samples or DEFAULT_TEXT_WINDOWS,
    )  # fmt: skip
    sessions = [open_session(p) for p in (dense, pruned)]
    check_comparable(*sessions)
    names = [o.name for o in sessions[0].get_outputs()]

    def runner(session: Any) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
        def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            try:
                return dict(zip(names, session.run(names, dict(feed)), strict=True))
            except Exception as exc:  # onnxruntime's own types: data the model cannot run on
                reason = str(exc).splitlines()[0]
                raise GraphpruneError(f"onnxruntime cannot run the model on the `calib` data: {reason}") from None

        return run

    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress("comparing outputs", done, source.total)

    feeds = (validate_feed(feed, specs, label) for label, feed in source)
    return compare_outputs(runner(sessions[0]), runner(sessions[1]), feeds, on_batch=advance)


def perplexity_windows(
    text: str | Path | None,
    tokenizer: str | Path | None,
    token_windows: str | Path | None,
    seqlen: int = 512,
    count: int | None = None,
    offset: int = 0,
    bos: str | None = None,
) -> tuple[np.ndarray, str]:
    """The token windows perplexity is measured on, and which BOS each starts with: ``token_windows`` as saved,
    or non-overlapping windows of ``seqlen`` tokens of ``text`` from ``offset`` on (at most ``count``)."""
    from graphprune.evaluate.perplexity import find_bos, load_token_windows, text_windows

    if token_windows is not None:
        return load_token_windows(Path(token_windows), count), "as given in the windows file"
    if text is None:
        raise GraphpruneError("perplexity needs `text` or `token_windows`")
    if tokenizer is None:
        raise GraphpruneError("`text` needs a `tokenizer` (a tokenizer.json)")
    text, tokenizer = Path(text), Path(tokenizer)
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
