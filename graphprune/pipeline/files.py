"""The library calls behind the command line: prune a file, check a file."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from graphprune.algorithms.pattern import NMPattern
from graphprune.algorithms.scores import Method
from graphprune.artifacts import OutputPlan
from graphprune.calibration.request import CalibrationRequest
from graphprune.errors import GraphpruneError
from graphprune.graph.model_io import (
    default_output,
    load_model,
    uses_external_data,
)
from graphprune.graph.targets import Target
from graphprune.passes.base import Statistics
from graphprune.passes.check import CheckPass, CheckResult
from graphprune.passes.prune import PruneConfig, PrunePass, PruneResult
from graphprune.pipeline.budget import budget_warnings, statistics_bytes

if TYPE_CHECKING:
    from graphprune.pipeline.segments import SegmentProgress


def report_path(output: Path) -> Path:
    """The JSON report beside a pruned model: ``<stem>.report.json``."""
    return output.with_name(f"{output.stem}.report.json")


def prune_file(
    model_path: str | Path,
    config: PruneConfig,
    output: str | Path | None = None,
    stats: Statistics | Mapping[str, np.ndarray] | None = None,
    force: bool = False,
    calibration: CalibrationRequest | None = None,
    sequential: str | None = None,
    on_plan: Callable[[int], None] | None = None,
    on_weight: Callable[[str], None] | None = None,
    on_message: Callable[[str], None] | None = None,
    on_group: Callable[[int, int], None] | None = None,
    reads: Iterable[str | Path] = (),
    on_calibration: Callable[[int, int | None], None] | None = None,
    on_segment: Callable[[SegmentProgress], None] | None = None,
    max_memory: int | None = None,
) -> tuple[Path, PruneResult]:
    """Prune ``model_path`` into ``output`` (default ``<stem>.pruned.onnx``) and write the JSON report beside it.

    Statistics come from ``stats`` (saved by calibration) or are computed from ``calibration``: one-shot on
    the dense model, or with ``sequential`` ("block" or "level") group by group on the already pruned model,
    as the reference implementations do. The input is never modified; nothing is written when anything fails.

    Each weight is pruned while the model is written, one at a time (``PrunePass(defer=True)``): with external
    data only the graph and one weight are in memory, and an inline model never holds its pruned weights next to
    the serialised copy. ``sequential`` prunes in memory: later groups' calibration runs on the pruned weights;
    a model with external data calibrated ``sequential`` or within ``calibration.max_memory`` runs segment by
    segment instead and never holds all its weights (:mod:`graphprune.pipeline.segments`).
    ``max_memory`` (bytes; default ``calibration.max_memory``) is honoured where it can be, and otherwise warned
    about or refused before any work (:mod:`graphprune.pipeline.budget`). Magnitude reads no activations: given
    calibration data, it says so and does not calibrate.
    ``reads`` names other files the caller read (a statistics file): no output may replace them.
    Callbacks: ``on_plan(weights)``, ``on_weight(name)`` after each weight, ``on_group(done, groups)`` per
    sequential group, ``on_calibration(samples_done, samples_total)`` per one-shot calibration batch,
    ``on_segment(step)`` per segment of a segment-wise run.
    """
    model_path = Path(model_path)
    out = Path(output) if output is not None else default_output(model_path)
    outputs = OutputPlan([*reads, *(calibration.files() if calibration else ())], force)
    outputs.read(model_path, "the input model")
    out, report = outputs.model(out), outputs.file(report_path(out), "report")
    outputs.check()  # before any work
    if sequential and calibration is None:
        raise GraphpruneError("--sequential needs calibration data: pass --calib DATA")
    model = load_model(model_path)
    external = uses_external_data(model)
    prune = PrunePass(config=config, stats=stats)
    targets, skips = prune.plan(model)
    if not targets:
        reasons = sorted({s.reason for s in skips})
        detail = f": {len(skips)} weight-like tensors skipped ({'; '.join(reasons[:2])})" if skips else ""
        raise GraphpruneError(f"nothing to prune in {model_path}{detail}")
    if on_plan:
        on_plan(len(targets))
    notes: list[str] = []
    if calibration is not None and config.method is Method.MAGNITUDE:  # masks from |W| alone
        notes.append("--method magnitude uses no activations: the calibration data is not read")
        calibration, sequential = None, None
    budget = max_memory if max_memory is not None else calibration.max_memory if calibration else None
    if calibration is not None and budget != calibration.max_memory:
        calibration = replace(calibration, max_memory=budget)
    notes += budget_warnings(model, model_path, budget, calibration is not None, targets, statistics_bytes(stats))
    warnings: list[str] = []
    # Calibrated segment by segment, the model is written as it is pruned (pipeline/segments.py).
    by_segment = calibration is not None and (sequential is not None or calibration.max_memory is not None)
    streamed = by_segment and external
    staged = None
    if streamed and calibration is not None:
        from graphprune.pipeline.segments import prune_in_segments
        from graphprune.pipeline.streaming import StagedOutput

        staged = StagedOutput(out)
        try:
            result, warnings, _ = prune_in_segments(
                model,
                model_path.parent,
                out,
                config,
                calibration,
                sequential or "oneshot",
                (targets, skips),
                on_weight,
                on_segment,
                staged,
            )
        except BaseException:
            staged.close()
            raise
    elif sequential and calibration is not None:
        from graphprune.calibration.providers import resolve_providers
        from graphprune.pipeline.sequential import prune_sequentially

        batches, warnings = calibration.batches(model)
        result, more = prune_sequentially(
            model,
            config,
            batches,
            resolve_providers(calibration.provider),
            on_group,
            on_weight,
            sequential,
            (targets, skips),
        )
        warnings += more
    else:
        if calibration is not None and config.method is not Method.MAGNITUDE:
            from graphprune.calibration import ActivationStats, calibrate
            from graphprune.calibration.gram_budget import GIB, calibrate_within

            request = replace(calibration, gram=config.method.reconstructs)

            def calibrate_chunk(chunk: list[Target]) -> ActivationStats:
                # ONNX Runtime reads the stored weights
                return calibrate(model_path, request, chunk, progress=on_calibration)

            if config.method.reconstructs:
                stats = calibrate_within(targets, int(calibration.gram_memory_gb * GIB), calibrate_chunk)
            else:
                stats = calibrate_chunk(targets)
            warnings = stats.warnings
        prune = PrunePass(config=config, stats=stats, plan=(targets, skips), defer=True, on_weight=on_weight)
        result = prune(model)
    for message in notes + warnings if on_message else ():
        on_message(message)
    try:
        with outputs.transaction() as files:
            if staged is None:
                files.model(out, model, external_data=True if external else None)  # the input's external layout
            else:  # written while it was pruned: lands with the report
                files.streamed_model(out, *staged.stage(staged.model))
            files.json(report, result.to_dict())
    finally:
        if staged is not None:
            staged.close()
    return out, result


def check_file(
    model_path: str | Path,
    pattern: NMPattern,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    include_head: bool = False,
) -> CheckResult:
    """Verify the N:M pattern of every selected target of the model at ``model_path``."""
    model = load_model(model_path)
    return CheckPass(pattern, include, exclude, include_head)(model)
