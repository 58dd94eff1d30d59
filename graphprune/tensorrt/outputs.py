"""Writing an engine, its report and the timing cache: checked before the build, committed together after it,
never half-written, through graphprune's one writer (:mod:`graphprune.artifacts`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from graphprune.artifacts import OutputPlan, write_files


def check_writable(path: Path, force: bool) -> None:
    """Fail before a long build if ``path`` cannot be written: a directory, a special file, existing without
    ``force``, or a folder that refuses (read-only, immutable)."""
    plan = OutputPlan(force=force)
    plan.file(path, "engine")
    plan.check()


def commit(files: Mapping[Path, bytes]) -> None:
    """Stage every file beside its target, flush it, then rename them all into place (all or none)."""
    write_files(files)  # force: the build checked its outputs before it started
