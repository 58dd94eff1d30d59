"""What a pruning run tells its caller as it goes: one object with the few events the command line shows.

The library draws nothing. A caller that wants to show progress passes an object with these methods (subclass
:class:`PruneProgress` to inherit a silent default for the events it does not show); :data:`SILENT` shows none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class SegmentProgress:
    """Where a segment-wise run is, after each segment."""

    done: int  # segments calibrated and pruned
    total: int
    tokens_per_second: float | None  # calibration throughput of the last segment (None: no token input)
    memory_bytes: int  # resident set size of this process now
    spilled_bytes: int  # boundary tensors written to disk so far


class PruneProgress(Protocol):
    """The events of a pruning run, in the order they come. Each method's body is the silent default."""

    def planned(self, weights: int) -> None:
        """The plan is made: this many weights will be pruned."""
        return None  # an explicit body: a default, not an abstract method

    def calibrated(self, samples_done: int, samples_total: int | None) -> None:
        """One-shot calibration ran another batch (``samples_total`` None when the source does not say)."""
        return None

    def group_done(self, done: int, total: int) -> None:
        """Sequential runs: a group (block or level) was calibrated and pruned."""
        return None

    def segment_done(self, step: SegmentProgress) -> None:
        """Segment-wise runs: a segment was calibrated and pruned, with its throughput and memory."""
        return None

    def weight_pruned(self, name: str) -> None:
        """A weight was pruned (one-shot runs: as it is written; calls come one at a time)."""
        return None

    def warning(self, text: str) -> None:
        """Something the user should know that does not stop the run (budget not enforced, data unused...)."""
        return None


class _Silent(PruneProgress):
    pass


SILENT: PruneProgress = _Silent()
