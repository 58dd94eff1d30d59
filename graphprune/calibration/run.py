"""calibrate(): run the tapped model in ONNX Runtime over streamed data and accumulate statistics in float64.

Only the tap outputs are fetched (a few vectors per batch), and the graph ends at the last tapped tensor: model
outputs, heads and every node downstream of all taps are cut away, never computed. The weights are not copied:
ONNX Runtime reads external data (and, for a model given as a path, the weights inside the ``.onnx`` file) from
disk itself, and in-memory weights as OrtValues over the same buffers. The library draws nothing: progress goes
to an optional callback.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from graphprune.calibration.gram_taps import GramSums
from graphprune.calibration.model_file import open_model
from graphprune.calibration.providers import resolve_providers
from graphprune.calibration.request import CalibrationRequest
from graphprune.calibration.session import Session
from graphprune.calibration.signature import feed_samples
from graphprune.calibration.stats import ActivationStats, TargetInfo, fingerprint
from graphprune.calibration.taps import TapPlan, plan_taps, tapped_model
from graphprune.errors import GraphpruneError
from graphprune.graph.targets import Target

# Called after every batch with (samples done so far, total samples when the source knows it).
Progress = Callable[[int, "int | None"], None]


def calibrate(
    model: ir.Model | onnx.ModelProto | str | Path,
    request: CalibrationRequest | None = None,
    targets: Sequence[Target] | None = None,
    progress: Progress | None = None,
) -> ActivationStats:
    """Σx² per input channel (and XᵀX with ``request.gram``) of every target weight over ``request.data``.

    ``model`` is left unchanged; given as a path, its weights are never loaded into Python. ``targets`` defaults
    to every prunable weight, head included. ``request`` holds the data and every option (see
    :class:`CalibrationRequest`); by default synthetic inputs from the model's signature. ``progress(done,
    total)`` is called after every batch with the samples done so far.
    """
    request = request or CalibrationRequest()
    graph_model = _open(model)
    if targets is None:
        from graphprune.graph.targets import find_targets

        targets = find_targets(graph_model, include_head=True).targets
    if not targets:
        raise GraphpruneError("the model has no prunable weights (MatMul, Gemm or Conv with a stored weight)")
    providers = resolve_providers(request.provider)
    feeds = request.open(graph_model)
    stream = iter(feeds)
    first = next(stream, None)  # one-line error about the data before any work
    if first is None:
        raise GraphpruneError("the calibration data is empty")
    with plan_taps(graph_model, targets, request.gram) as plan:
        session = Session(tapped_model(graph_model, plan), providers, request.optimize)
    del graph_model  # a model opened here: nothing of it is needed any more
    warnings = [*feeds.source.warnings, *plan.warnings]
    if session.providers()[0] != providers[0]:
        warnings.append(f"onnxruntime fell back from {providers[0]} to {session.providers()[0]}")
    acc = Accumulator(plan)
    label, feed = first
    done = 0
    while True:
        outputs = session.run(plan.output_names, feed, label)
        acc.add(outputs)
        done += feed_samples(feed)
        if progress is not None:
            progress(done, feeds.source.total)
        nxt = next(stream, None)
        if nxt is None:
            break
        label, feed = nxt
    return acc.result(targets, warnings)


def _open(model: ir.Model | onnx.ModelProto | str | Path) -> ir.Model:
    """The model as onnx-ir: a path is opened with every weight left on disk; a protobuf is wrapped, not copied."""
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        return ir.from_proto(model)
    return open_model(model)


class Accumulator:
    """Float64 sums per tap, folded into per-target statistics at the end."""

    def __init__(self, plan: TapPlan) -> None:
        self.plan = plan
        self.sumsq = [np.zeros(t.k, dtype=np.float64) for t in plan.taps]
        self.rows = [0 for _ in plan.taps]
        self.gram = [GramSums(t.gram) if t.gram else None for t in plan.taps]
        self.sums = [np.zeros(t.k, dtype=np.float64) if t.sum_output else None for t in plan.taps]

    def add(self, outputs: Sequence[np.ndarray]) -> None:
        named = dict(zip(self.plan.output_names, outputs, strict=True))
        for i, tap in enumerate(self.plan.taps):
            self.sumsq[i] += named[tap.sumsq_output]
            rows = int(named[tap.size_output]) // tap.k
            self.rows[i] += rows
            g = self.gram[i]
            if g is not None:
                g.add(named, rows)
            s = self.sums[i]
            if s is not None and tap.sum_output is not None:
                s += named[tap.sum_output]

    def result(self, targets: Sequence[Target], warnings: list[str]) -> ActivationStats:
        reads: dict[str, list[int]] = {}
        for i, tap in enumerate(self.plan.taps):
            for name in tap.targets:
                reads.setdefault(name, []).append(i)
        sumsq: dict[str, np.ndarray] = {}
        rows: dict[str, int] = {}
        gram: dict[str, np.ndarray] = {}
        sums: dict[str, np.ndarray] = {}
        gram_sums: dict[str, np.ndarray] = {}
        gram_rows: dict[str, int] = {}
        done = [None if g is None else g.result() for g in self.gram]
        for t in targets:
            idx = reads.get(t.name, [])
            sumsq[t.name] = sum((self.sumsq[i] for i in idx), np.zeros(t.k, dtype=np.float64))
            rows[t.name] = sum(self.rows[i] for i in idx)
            grams = [g for i in idx if (g := done[i]) is not None]
            if grams and len(grams) == len(idx):
                gram[t.name] = (
                    grams[0][0] if len(grams) == 1 else sum((g[0] for g in grams[1:]), grams[0][0].copy())
                )
                sampled = [(total, n) for _, total, n in grams if total is not None and n is not None]
                if len(sampled) == len(grams):  # the Gram's own rows: strided, or sampled by the token mask
                    gram_sums[t.name] = sum((total for total, _ in sampled), np.zeros(t.k))
                    gram_rows[t.name] = sum(n for _, n in sampled)
            parts = [s for i in idx if (s := self.sums[i]) is not None]
            if parts and len(parts) == len(idx):
                sums[t.name] = sum(parts[1:], parts[0].copy())
            warnings.extend(_health(t.name, sumsq[t.name], rows[t.name]))
        return ActivationStats(
            sumsq=sumsq,
            rows=rows,
            targets={t.name: TargetInfo(tuple(t.shape), t.k_axis) for t in targets},
            model_fingerprint=fingerprint(targets),
            gram=gram,
            warnings=warnings,
            sums=sums,
            gram_sums=gram_sums,
            gram_rows=gram_rows,
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
