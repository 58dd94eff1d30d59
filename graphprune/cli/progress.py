"""One progress bar style for every long command, on stderr."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from graphprune.cli.app import console

if TYPE_CHECKING:
    from graphprune.pipeline.segments import SegmentProgress


@dataclass
class Bar:
    progress: Progress
    task: TaskID

    def advance(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)

    def set_total(self, total: int) -> None:
        self.progress.update(self.task, total=total)

    def describe(self, text: str) -> None:
        self.progress.update(self.task, description=text)

    def set_detail(self, text: str) -> None:
        """Text after the bar: throughput, memory in use."""
        self.progress.update(self.task, detail=text)


def segment_detail(step: SegmentProgress) -> str:
    """A segment-wise run's figures: calibration tokens per second, memory in use, activations spilled."""
    parts = [f"{step.tokens_per_second:,.0f} tok/s"] if step.tokens_per_second else []
    parts.append(f"RSS {_size(step.memory_bytes)}")
    if step.spilled_bytes:
        parts.append(f"spilled {_size(step.spilled_bytes)}")
    return ", ".join(parts)


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


@contextmanager
def progress_bar(description: str, total: int | None = None) -> Iterator[Bar]:
    """A transient bar that disappears when the work is done."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[detail]}"),
        console=console,
        transient=True,
    ) as progress:
        yield Bar(progress, progress.add_task(description, total=total, detail=""))
