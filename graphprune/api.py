"""The library calls behind the command line: prune a file, check a file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from graphprune.model_io import check_output_path, default_output, has_external_data, load_model, save_model
from graphprune.passes.check import CheckPass, CheckResult
from graphprune.passes.prune import PruneConfig, PrunePass, PruneResult, Statistics
from graphprune.pattern import NMPattern


def report_path(output: Path) -> Path:
    """The JSON report beside a pruned model: ``<stem>.report.json``."""
    return output.with_name(f"{output.stem}.report.json")


def prune_file(
    model_path: str | Path,
    config: PruneConfig,
    output: str | Path | None = None,
    stats: Statistics | Mapping[str, np.ndarray] | None = None,
    force: bool = False,
    on_plan: Callable[[int], None] | None = None,
    on_weight: Callable[[str], None] | None = None,
) -> tuple[Path, PruneResult]:
    """Prune ``model_path`` into ``output`` (default ``<stem>.pruned.onnx``) and write the JSON report beside it.

    The input is never modified; nothing is written when anything fails. Returns the output path and the result.
    """
    model_path = Path(model_path)
    out = Path(output) if output is not None else default_output(model_path)
    check_output_path(model_path, out, force)
    model = load_model(model_path)
    prune = PrunePass(config, stats, on_weight)
    targets, _ = prune.plan(model)
    prune.check_statistics(targets)  # fails early, before any work, on statistics that don't match
    if on_plan:
        on_plan(len(targets))
    result = prune.call(model)
    save_model(model, out, external_data=True if has_external_data(model_path) else None)
    write_json(report_path(out), result.to_dict())
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
    return CheckPass(pattern, include, exclude, include_head).call(model)


def write_json(path: Path, data: object) -> None:
    """Write JSON atomically (temporary file beside it, then rename)."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(data, stream, indent=1)
            stream.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
