"""The library call behind ``graphprune calibrate``: statistics measured once, saved for any number of prunes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from graphprune.errors import GraphpruneError

if TYPE_CHECKING:
    from graphprune.calibration import ActivationStats, CalibrationRequest, Progress


def statistics_path(output: Path) -> Path:
    """``output`` with ``.npz`` appended unless it has it (numpy's own rule for ``np.savez``)."""
    return output if output.suffix == ".npz" else output.with_name(output.name + ".npz")


def calibrate_file(
    model: str | Path,
    output: str | Path,
    request: CalibrationRequest | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> tuple[Path, ActivationStats]:
    """Calibrate ``model`` on ``request``'s data and save the statistics to ``output`` (``.npz`` appended when
    missing); returns the path written and the statistics.

    The output is checked before the work (``force`` replaces an existing file; it may not be an input);
    statistics with NaN or infinity (activations that overflowed) are refused, not saved: no prune could use them.
    """
    from graphprune.artifacts import OutputPlan
    from graphprune.calibration import CalibrationRequest, calibrate
    from graphprune.calibration.stats_checks import refuse_non_finite
    from graphprune.model_checks import check_model_file

    model, output = Path(model), Path(output)
    request = request or CalibrationRequest()
    if output.is_dir():  # not "<dir>.npz" beside it: say so
        raise GraphpruneError(f"{output} is a directory: give a file name for the statistics, e.g. stats.npz")
    outputs = OutputPlan(request.files(), force)
    outputs.read(model, "the input model")
    target = outputs.file(statistics_path(output), "statistics")
    outputs.check()  # before calibrating
    if model.is_file():
        check_model_file(model)  # corrupt tensors in one line, before ONNX Runtime meets them
    stats = calibrate(model, request, progress=progress)
    refuse_non_finite({**stats.sumsq, **stats.gram}, nothing_written=True)
    with outputs.transaction() as files:
        files.produce(target, stats.save, "statistics")
    return target, stats
