"""The files a build writes (the engine, its ``<engine>.json`` report and the timing cache), planned and checked
before the build through graphprune's one writer (:mod:`graphprune.artifacts`), committed together after it."""

from __future__ import annotations

from pathlib import Path

from graphprune.artifacts import OutputPlan
from graphprune.tensorrt.report import report_path


def plan_outputs(onnx_path: Path, engine_path: Path, timing_cache: Path | None, force: bool) -> OutputPlan:
    """Every file the build will write, checked now: the engine and its report are refused when they exist
    without ``force``, or when either is the model, its external data or the other; the timing cache is read and
    rewritten on purpose, so it may exist, but it may not be the engine, the report or the model."""
    plan = OutputPlan(force=force)
    plan.read(onnx_path, "the input model")
    plan.file(engine_path, "engine")
    plan.file(report_path(engine_path), "engine report")
    if timing_cache is not None:
        plan.file(timing_cache, "timing cache", replace=True)
    plan.check()
    return plan
