"""One progress bar style for every long command, on stderr."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

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


@contextmanager
def progress_bar(description: str, total: int | None = None) -> Iterator[Bar]:
    """A transient bar that disappears when the work is done."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as progress:
        yield Bar(progress, progress.add_task(description, total=total))
