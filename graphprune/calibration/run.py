"""calibrate(): run the tapped model in ONNX Runtime over streamed data and accumulate statistics in float64.

Only the tap outputs are fetched (a few vectors per batch), so memory stays that of a plain inference run.
The tapped model is serialised to bytes in memory; the weights of a model with external data are not loaded
into Python (ONNX Runtime reads them from the model's directory), and an in-memory model over 2 GB is written
with external data to a temporary directory, never to the working directory.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from graphprune.calibration.data import open_source
from graphprune.calibration.providers import import_ort, resolve_providers, session_options
from graphprune.calibration.signature import feed_samples, model_inputs, validate_feed
from graphprune.calibration.stats import ActivationStats, TargetInfo, fingerprint
from graphprune.calibration.taps import TapPlan, plan_taps, tapped
from graphprune.errors import GraphpruneError
from graphprune.graph.targets import Target

_PROTOBUF_LIMIT = 2**31 - 2**24  # leave room under protobuf's 2 GiB for the taps and headers
_EXTERNAL_FOLDER = "session.model_external_initializers_file_folder_path"  # for models loaded from bytes


def calibrate(
    model: onnx.ModelProto | str | Path,
    data: Any = None,
    targets: Sequence[Target] | None = None,
    *,
    provider: str = "cpu",
    batch_size: int = 8,
    tokenizer: str | Path | None = None,
    seqlen: int = 512,
    nsamples: int = 128,
    seed: int = 0,
    shapes: Mapping[str, Sequence[int]] | None = None,
    gram: bool = False,
    optimize: bool = False,
    progress: bool = True,
) -> ActivationStats:
    """Σx² per input channel of every target weight over ``data`` (see :func:`open_source` for the kinds).

    ``model`` given as a ModelProto is left unchanged; given as a path, its external data is never loaded into
    Python. ``targets`` defaults to every prunable weight, head included. ``gram`` also collects XᵀX.
    ``optimize`` lets ONNX Runtime optimise the tapped graph (off by default, as the issue asks; the taps are
    ordinary consumers of the tensors they read, so fusions cannot remove those tensors, only skip them).
    """
    proto, base_dir = _load(model)
    if targets is None:
        import onnx_ir as ir

        from graphprune.graph.targets import find_targets

        targets = find_targets(ir.from_proto(proto), include_head=True).targets
    if not targets:
        raise GraphpruneError("the model has no prunable weights (MatMul, Gemm or Conv with a stored weight)")
    providers = resolve_providers(provider)
    specs = model_inputs(proto)
    source = open_source(
        data,
        proto,
        specs,
        batch_size=batch_size,
        tokenizer=tokenizer,
        seqlen=seqlen,
        nsamples=nsamples,
        seed=seed,
        shapes=shapes,
    )
    feeds = iter(source)
    first = next(feeds, None)
    if first is None:
        raise GraphpruneError("the calibration data is empty")
    first_feed = validate_feed(first[1], specs, first[0])  # one-line error before any work
    plan = plan_taps(proto, targets, gram=gram)
    tapped_model = _serialise(proto, plan, base_dir)
    del proto  # when read from a file it is ours: free its weights before onnxruntime loads its own copy
    session = _session(tapped_model, providers, optimize)
    del tapped_model
    warnings = [*source.warnings, *plan.warnings]
    if session.get_providers()[0] != providers[0]:
        warnings.append(f"onnxruntime fell back from {providers[0]} to {session.get_providers()[0]}")

    acc = Accumulator(plan)
    with _progress(progress) as bar:
        task = bar.add_task("calibrating", total=source.total)
        label, feed = first[0], first_feed
        while True:
            try:
                outputs = session.run(plan.output_names, feed)
            except Exception as exc:
                raise GraphpruneError(f"{label}: onnxruntime failed: {str(exc).splitlines()[0]}") from None
            acc.add(outputs)
            bar.advance(task, feed_samples(feed))
            nxt = next(feeds, None)
            if nxt is None:
                break
            label, feed = nxt[0], validate_feed(nxt[1], specs, nxt[0])
    return acc.result(targets, warnings)


class Accumulator:
    """Float64 sums per tap, folded into per-target statistics at the end."""

    def __init__(self, plan: TapPlan) -> None:
        self.plan = plan
        self.index = {name: i for i, name in enumerate(plan.output_names)}
        self.sumsq = [np.zeros(t.k, dtype=np.float64) for t in plan.taps]
        self.rows = [0 for _ in plan.taps]
        self.gram = [np.zeros((t.k, t.k), dtype=np.float64) if t.gram_output else None for t in plan.taps]

    def add(self, outputs: Sequence[np.ndarray]) -> None:
        for i, tap in enumerate(self.plan.taps):
            self.sumsq[i] += outputs[self.index[tap.sumsq_output]]
            self.rows[i] += int(outputs[self.index[tap.size_output]]) // tap.k
            g = self.gram[i]
            if g is not None and tap.gram_output is not None:
                g += outputs[self.index[tap.gram_output]]

    def result(self, targets: Sequence[Target], warnings: list[str]) -> ActivationStats:
        reads: dict[str, list[int]] = {}
        for i, tap in enumerate(self.plan.taps):
            for name in tap.targets:
                reads.setdefault(name, []).append(i)
        sumsq, rows, gram = {}, {}, {}
        for t in targets:
            idx = reads.get(t.name, [])
            sumsq[t.name] = sum((self.sumsq[i] for i in idx), np.zeros(t.k, dtype=np.float64))
            rows[t.name] = sum(self.rows[i] for i in idx)
            grams = [self.gram[i] for i in idx]
            if grams and all(g is not None for g in grams):
                gram[t.name] = grams[0] if len(grams) == 1 else sum(grams[1:], grams[0].copy())  # type: ignore[union-attr]
            warnings.extend(_health(t.name, sumsq[t.name], rows[t.name]))
        return ActivationStats(
            sumsq=sumsq,
            rows=rows,
            targets={t.name: TargetInfo(tuple(t.shape), t.k_axis) for t in targets},
            model_fingerprint=fingerprint(targets),
            gram=gram,
            warnings=warnings,
        )


def _health(name: str, sumsq: np.ndarray, rows: int) -> list[str]:
    if rows == 0:
        return [f"weight {name}: no activation rows were seen; it will be scored as zero"]
    out = []
    bad = int(np.count_nonzero(~np.isfinite(sumsq)))
    if bad:
        out.append(f"weight {name}: {bad} of {sumsq.size} input channels have NaN or Inf statistics (scored as 0)")
    dead = int(np.count_nonzero(sumsq == 0))
    if dead:
        out.append(
            f"weight {name}: {dead} of {sumsq.size} input channels never saw a non-zero value (scored as 0)"
        )
    return out


def _load(model: onnx.ModelProto | str | Path) -> tuple[onnx.ModelProto, Path | None]:
    """The model and, when it was read from a file, the directory its external data lives in."""
    if isinstance(model, onnx.ModelProto):
        return model, None
    path = Path(model)
    if not path.is_file():
        raise GraphpruneError(f"model not found: {path}")
    try:
        return onnx.load(str(path), load_external_data=False), path.parent
    except Exception as exc:
        raise GraphpruneError(f"cannot read ONNX model {path}: {str(exc).splitlines()[0]}") from None


def _external_locations(model: onnx.ModelProto) -> set[str]:
    locations = set()
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            locations |= {e.value for e in init.external_data if e.key == "location"}
    return locations


@dataclass
class _Tapped:
    """The tapped model as ONNX Runtime will load it: bytes, or a file in a temporary directory."""

    model: bytes | str
    config: dict[str, str] = field(default_factory=dict)
    tmp: tempfile.TemporaryDirectory[str] | None = None


def _serialise(model: onnx.ModelProto, plan: TapPlan, base_dir: Path | None) -> _Tapped:
    locations = _external_locations(model)
    if locations or model.ByteSize() < _PROTOBUF_LIMIT:
        config = {}
        if locations:  # the weights stay in their files, read by onnxruntime from the model's directory
            if base_dir is None:
                raise GraphpruneError("the model's weights are in external files: pass the model's path")
            config[_EXTERNAL_FOLDER] = str(base_dir.resolve())
        with tapped(model, plan) as m:
            return _Tapped(m.SerializeToString(), config)
    tmp = tempfile.TemporaryDirectory(prefix="graphprune-calib-")  # an in-memory model over 2 GB
    path = Path(tmp.name) / "tapped.onnx"
    copy = onnx.ModelProto()
    with tapped(model, plan) as m:
        copy.CopyFrom(m)
    onnx.save_model(copy, str(path), save_as_external_data=True, location="weights.bin")
    return _Tapped(str(path), tmp=tmp)


def _session(tapped_model: _Tapped, providers: list[str], optimize: bool) -> Any:
    ort = import_ort()
    options = session_options(optimize)
    for key, value in tapped_model.config.items():
        options.add_session_config_entry(key, value)
    try:
        session = ort.InferenceSession(tapped_model.model, options, providers=providers)
        if isinstance(getattr(session, "_model_bytes", None), bytes):
            # onnxruntime's Python wrapper keeps the model bytes to re-create the session on a provider
            # fallback (its own TODO calls this bad); we never re-create it, and the bytes are a whole copy
            # of the weights.
            session._model_bytes = None
        return session
    except Exception as exc:
        raise GraphpruneError(f"onnxruntime cannot run the model: {str(exc).splitlines()[0]}") from None
    finally:
        if tapped_model.tmp is not None:
            tapped_model.tmp.cleanup()


class _Rate(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} samples/s" if speed else "- samples/s", style="cyan")


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _Rate(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )
