"""The one progress display of the command line, on stderr, fed by the library's progress events.

A command opens one :func:`display` and adds a line per stage (``calibrating``, ``pruning``, ...); all lines live
in the same rich ``Progress``, so stages never draw over each other. The library itself draws nothing: it calls
``progress(done, total)``-style callbacks, which :class:`Bar` provides, or the methods of a progress object
(:class:`PruningDisplay` for pruning).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from graphprune.cli.app import console
from graphprune.pipeline.boundary import format_size as _size
from graphprune.pipeline.progress import PruneProgress, SegmentProgress


class _Rate(ProgressColumn):
    """Items per second for the stages that declare a unit (calibration: samples/s)."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit")
        speed = task.finished_speed or task.speed
        if not unit:
            return Text("")
        return Text(f"{speed:.1f} {unit}/s" if speed else f"- {unit}/s", style="cyan")


@dataclass
class Bar:
    """One line of the display; its methods are the callbacks library functions take."""

    progress: Progress
    task: TaskID

    def advance(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)

    def set_total(self, total: int) -> None:
        self.progress.update(self.task, total=total)

    def describe(self, text: str) -> None:
        self.progress.update(self.task, description=text)

    def update(self, done: int, total: int | None = None) -> None:
        """``(done, total)`` callback: absolute progress."""
        self.progress.update(self.task, completed=done, total=total)

    def finish(self) -> None:
        task = self.progress.tasks[self.task]
        self.progress.update(self.task, completed=task.total or task.completed, visible=False)

    def set_detail(self, text: str) -> None:
        """Text after the bar: throughput, memory in use."""
        self.progress.update(self.task, detail=text)


@dataclass
class Display:
    progress: Progress

    def bar(self, description: str, total: int | None = None, unit: str = "") -> Bar:
        """A new line of the display (added below the others)."""
        return Bar(self.progress, self.progress.add_task(description, total=total, unit=unit, detail=""))


def segment_detail(step: SegmentProgress) -> str:
    """A segment-wise run's figures: calibration tokens per second, memory in use, activations spilled."""
    parts = [f"{step.tokens_per_second:,.0f} tok/s"] if step.tokens_per_second else []
    parts.append(f"RSS {_size(step.memory_bytes)}")
    if step.spilled_bytes:
        parts.append(f"spilled {_size(step.spilled_bytes)}")
    return ", ".join(parts)


class PruningDisplay(PruneProgress):
    """What ``apply`` shows of a pruning run: the pruning bar (with the group or segment it is at), a calibration
    bar opened on the first batch (magnitude never calibrates), each warning as a yellow line."""

    def __init__(self, shown: Display, unit: str) -> None:
        self.shown = shown
        self.unit = unit  # what a sequential group is: "block" or "level"
        self.bar = shown.bar("pruning")
        self.calibrating: Bar | None = None

    def planned(self, weights: int) -> None:
        self.bar.set_total(weights)

    def calibrated(self, samples_done: int, samples_total: int | None) -> None:
        if self.calibrating is None:
            self.calibrating = self.shown.bar("calibrating", samples_total, unit="samples")
        self.calibrating.update(samples_done, samples_total)

    def group_done(self, done: int, total: int) -> None:  # the cost: one calibration segment per group
        self.bar.describe(f"pruning {self.unit} {min(done + 1, total)}/{total}")

    def segment_done(self, step: SegmentProgress) -> None:
        self.bar.describe(f"pruning: segment {min(step.done + 1, step.total)} of {step.total}")
        self.bar.set_detail(segment_detail(step))

    def weight_pruned(self, name: str) -> None:
        self.bar.advance()

    def warning(self, text: str) -> None:
        console.print(f"[yellow]warning:[/yellow] {text}", highlight=False)


@contextmanager
def display(enabled: bool = True) -> Iterator[Display]:
    """The one progress display of a command; transient: it disappears when the command's work is done."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        _Rate(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[detail]}"),
        console=console,
        transient=True,
        disable=not enabled,
    ) as progress:
        yield Display(progress)


@contextmanager
def progress_bar(description: str, total: int | None = None) -> Iterator[Bar]:
    """A display with a single line."""
    with display() as shown:
        yield shown.bar(description, total)
