"""The one progress display of the command line, on stderr, fed by the library's callbacks.

A command opens one :func:`display` and adds a line per stage (``calibrating``, ``pruning``, ...); all lines live
in the same rich ``Progress``, so stages never draw over each other. The library itself draws nothing: it calls
``on_progress(done, total)``-style callbacks, which :class:`Bar` provides.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from graphprune.pipeline.segments import SegmentProgress


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
