"""The library calls behind the command line: prune a file, check a file."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import onnx_ir as ir

from graphprune.algorithms.pattern import NMPattern
from graphprune.algorithms.quant_grid import QuantGrid
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
from graphprune.passes.base import StatisticsInput
from graphprune.passes.check import CheckPass, CheckResult
from graphprune.passes.prune import Plan, PruneConfig, PrunePass, PruneResult
from graphprune.pipeline.budget import budget_warnings, statistics_bytes
from graphprune.pipeline.progress import SILENT, PruneProgress
from graphprune.pipeline.sequential import SequentialUnit, check_sequential
from graphprune.pipeline.streaming import StagedOutput
from graphprune.quantize.joint import joint_config, prepare_opset, write_joint_qdq


def report_path(output: Path) -> Path:
    """The JSON report beside a pruned model: ``<stem>.report.json``."""
    return output.with_name(f"{output.stem}.report.json")


def prune_file(
    model_path: str | Path,
    config: PruneConfig,
    output: str | Path | None = None,
    *,
    stats: StatisticsInput = None,
    calibration: CalibrationRequest | None = None,
    sequential: SequentialUnit | None = None,
    max_memory: int | None = None,
    force: bool = False,
    reads: Iterable[str | Path] = (),
    progress: PruneProgress = SILENT,
) -> tuple[Path, PruneResult]:
    """Prune ``model_path`` into ``output`` (default ``<stem>.pruned.onnx``) and write the JSON report beside it.

    Statistics come from ``stats`` (saved by calibration) or are computed from ``calibration``: one-shot on
    the dense model, or with ``sequential`` ("block" or "level") group by group on the already pruned model,
    as the reference implementations do. The input is never modified; nothing is written when anything fails.

    One strategy runs, chosen from the inputs (:func:`_strategy`): one-shot (:func:`prune_one_shot`, each weight
    pruned while the model is written), sequential in memory (:func:`prune_sequential_in_memory`), or segment by
    segment for a model with external data calibrated sequentially or within ``max_memory``
    (:func:`prune_segment_wise`). ``max_memory`` (bytes; default ``calibration.max_memory``) is honoured where it
    can be, and otherwise warned about or refused before any work (:mod:`graphprune.pipeline.budget`).
    Magnitude reads no activations: given calibration data, it says so and does not calibrate.
    With ``config.quantize`` (SparseGPT's or ALPS's joint mode) the output is a Q/DQ model holding the solver's
    codes and scales (:mod:`graphprune.quantize.joint`; int8 and fp8 activations calibrated on ``calibration``
    after pruning); it needs the model in memory, so it is refused where the run would go segment by segment.
    ``reads`` names other files the caller read (a statistics file): no output may replace them. ``progress``
    hears of the plan, each calibration batch, group, segment and weight, and each warning.
    """
    model_path = Path(model_path)
    sequential = check_sequential(sequential)
    out = Path(output) if output is not None else default_output(model_path)
    outputs = OutputPlan([*reads, *(calibration.files() if calibration else ())], force)
    outputs.read(model_path, "the input model")
    out, report = outputs.model(out), outputs.file(report_path(out), "report")
    outputs.check()  # before any work
    if sequential and calibration is None:
        raise GraphpruneError("`sequential` needs calibration data: pass `calib` data")
    model = load_model(model_path)
    grid, raised = config.quantize, None
    if grid is not None:  # the Q/DQ options and the opset fail before any work
        joint_config(grid, config.include_head, config.exclude)
        raised = prepare_opset(model, grid)
    job = _Job(
        model=model,
        model_path=model_path,
        output=out,
        config=config,
        plan=_plan(model, model_path, config, stats),
        progress=progress,
    )
    progress.planned(len(job.plan[0]))
    notes: list[str] = []
    if calibration is not None and config.method is Method.MAGNITUDE:  # masks from |W| alone
        notes.append("`method=magnitude` uses no activations: the calibration data is not read")
        calibration, sequential = None, None
    budget = max_memory if max_memory is not None else calibration.max_memory if calibration else None
    if calibration is not None and budget != calibration.max_memory:
        calibration = replace(calibration, max_memory=budget)
    notes += budget_warnings(
        model, model_path, budget, calibration is not None, job.plan[0], statistics_bytes(stats)
    )
    external = uses_external_data(model)  # before pruning: deferred weights read from the data files are not
    strategy = _strategy(calibration, sequential, external)
    if grid is not None and strategy is prune_segment_wise:
        raise GraphpruneError(
            "joint quantization writes its Q/DQ model from the whole pruned model in memory; this model's "
            "external data with `sequential` or `max_memory` prunes it segment by segment: prune one-shot "
            "without `max_memory`, or prune first and quantize the pruned model by GPTQ under its mask"
        )
    pruned = strategy(job, stats, calibration, sequential)
    if grid is not None:
        _write_qdq(job, grid, calibration, pruned, raised)
    for message in notes + pruned.warnings:
        progress.warning(message)
    _commit(outputs, job, report, pruned, external)
    return out, pruned.result


def _commit(outputs: OutputPlan, job: _Job, report: Path, pruned: _Pruned, external: bool) -> None:
    """Write the pruned model (the input's external layout) and its report in one transaction."""
    try:
        with outputs.transaction() as files:
            if pruned.staged is None:  # deferred weights are pruned now, as they are written
                files.model(job.output, job.model, external_data=True if external else None)
            else:  # written while it was pruned: lands with the report
                assert pruned.staged.model is not None  # set when the pass streamed the weights
                files.streamed_model(job.output, *pruned.staged.stage(pruned.staged.model))
            files.json(report, pruned.result.to_dict())
    finally:
        if pruned.staged is not None:
            pruned.staged.close()


def _write_qdq(
    job: _Job, grid: QuantGrid, calibration: CalibrationRequest | None, pruned: _Pruned, raised: int | None
) -> None:
    """The joint mode's Q/DQ step on the pruned model in memory; its report and warnings join the run's."""
    config = job.config
    qdq = write_joint_qdq(
        job.model,
        grid,
        job.plan[0],
        calibration,
        include_head=config.include_head,
        exclude=config.exclude,
        label=f"{config.method.value}+{grid.precision}",
    )
    qdq.opset_raised_from = raised  # raised before the pruning, so the step itself found it high enough
    pruned.result.qdq = qdq.to_dict()
    pruned.warnings += [w for w in qdq.warnings if w not in pruned.warnings]


@dataclass(frozen=True, kw_only=True)
class _Job:
    """What every strategy is given: the loaded model, where it came from and goes, what to do, who listens."""

    model: ir.Model
    model_path: Path
    output: Path
    config: PruneConfig
    plan: Plan
    progress: PruneProgress


@dataclass
class _Pruned:
    """What a strategy leaves for the writer: the result, the calibration warnings and, for a model written
    while it was pruned, its staged output."""

    result: PruneResult
    warnings: list[str]
    staged: StagedOutput | None = None


Strategy = Callable[[_Job, StatisticsInput, CalibrationRequest | None, SequentialUnit | None], _Pruned]


def _plan(model: ir.Model, model_path: Path, config: PruneConfig, stats: StatisticsInput) -> Plan:
    """The targets to prune and the weights left alone; a one-line error when there is nothing to prune."""
    targets, skips = PrunePass(config=config, stats=stats).plan(model)
    if not targets:
        reasons = sorted({s.reason for s in skips})
        detail = f": {len(skips)} weight-like tensors skipped ({'; '.join(reasons[:2])})" if skips else ""
        raise GraphpruneError(f"nothing to prune in {model_path}{detail}")
    return targets, skips


def _strategy(
    calibration: CalibrationRequest | None, sequential: SequentialUnit | None, external: bool
) -> Strategy:
    """Segment-wise for a model with external data calibrated sequentially or within a memory budget (its
    weights never all in memory), sequential in memory for other sequential runs, one-shot otherwise."""
    by_segment = calibration is not None and (sequential is not None or calibration.max_memory is not None)
    if by_segment and external:
        return prune_segment_wise
    if sequential is not None and calibration is not None:
        return prune_sequential_in_memory
    return prune_one_shot


def prune_one_shot(
    job: _Job, stats: StatisticsInput, calibration: CalibrationRequest | None, sequential: SequentialUnit | None
) -> _Pruned:
    """Statistics from ``stats`` or one calibration of the dense model, then each weight pruned while the model
    is written, one at a time (``PrunePass(defer=True)``): with external data only the graph and one weight are
    in memory, and an inline model never holds its pruned weights next to the serialised copy."""
    assert sequential is None
    config, targets = job.config, job.plan[0]
    warnings: list[str] = []
    if calibration is not None and config.method is not Method.MAGNITUDE:
        from graphprune.calibration import ActivationStats, calibrate
        from graphprune.calibration.gram_budget import GIB, calibrate_within

        request = replace(calibration, gram=config.method.reconstructs)

        def calibrate_chunk(chunk: list[Target]) -> ActivationStats:
            # ONNX Runtime reads the stored weights
            return calibrate(job.model_path, request, chunk, progress=job.progress.calibrated)

        if config.method.reconstructs:
            stats = calibrate_within(targets, int(calibration.gram_memory_gb * GIB), calibrate_chunk)
        else:
            stats = calibrate_chunk(targets)
        warnings = stats.warnings
    defer = config.quantize is None  # the joint mode's Q/DQ step reads every pruned weight before the write
    prune = PrunePass(config=config, stats=stats, plan=job.plan, defer=defer, on_weight=job.progress.weight_pruned)
    return _Pruned(prune(job.model), warnings)


def prune_sequential_in_memory(
    job: _Job, stats: StatisticsInput, calibration: CalibrationRequest | None, sequential: SequentialUnit | None
) -> _Pruned:
    """Group by group, each calibrated on the activations of the groups pruned before it, the whole model in
    memory (:func:`graphprune.pipeline.sequential.prune_sequentially`)."""
    from graphprune.calibration.providers import resolve_providers
    from graphprune.pipeline.sequential import prune_sequentially

    assert calibration is not None and sequential is not None
    batches, warnings = calibration.batches(job.model)
    result, more = prune_sequentially(
        job.model,
        job.config,
        batches,
        resolve_providers(calibration.provider),
        sequential=sequential,
        plan=job.plan,
        progress=job.progress,
    )
    return _Pruned(result, warnings + more)


def prune_segment_wise(
    job: _Job, stats: StatisticsInput, calibration: CalibrationRequest | None, sequential: SequentialUnit | None
) -> _Pruned:
    """Segment by segment, each weight written into the staged output as it is pruned
    (:mod:`graphprune.pipeline.segments`); the caller commits the staged output with the report."""
    from graphprune.pipeline.segments import prune_in_segments

    assert calibration is not None
    staged = StagedOutput(job.output)
    try:
        result, warnings, _ = prune_in_segments(
            job.model,
            job.model_path.parent,
            job.output,
            job.config,
            calibration,
            sequential,
            job.plan,
            progress=job.progress,
            staged=staged,
        )
    except BaseException:
        staged.close()
        raise
    return _Pruned(result, warnings, staged)


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
