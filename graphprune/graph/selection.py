"""Which of the found targets a run prunes: name patterns, the output head, and pattern fit."""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from graphprune.algorithms.pattern import NMPattern, Pattern
from graphprune.graph.targets import Skip, Target, TargetScan


def select_targets(
    scan: TargetScan,
    pattern: Pattern,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> TargetScan:
    """Split ``scan.targets`` into the ones to prune and Skips that say why the others are left alone.

    A pattern (shell-style, ``*`` and ``?``) matches a weight's name or any of its consumers' node names.
    """
    chosen: list[Target] = []
    skips = list(scan.skips)
    for target in scan.targets:
        reason = _reason_to_leave(target, pattern, include, exclude)
        if reason:
            skips.append(Skip(target.name, target.op, reason))
        else:
            chosen.append(target)
    return TargetScan(chosen, skips)


def _reason_to_leave(target: Target, pattern: Pattern, include: Sequence[str], exclude: Sequence[str]) -> str:
    names = [target.name, *(c.node for c in target.consumers)]
    if include and not any(fnmatchcase(n, p) for n in names for p in include):
        return "not matched by `include`"
    hit = next((p for p in exclude for n in names if fnmatchcase(n, p)), None)
    if hit:
        return f"excluded by `exclude={hit}`"
    if isinstance(pattern, NMPattern) and target.k % pattern.group:
        return f"K={target.k} is not a multiple of the group size {pattern.group}"
    return ""
