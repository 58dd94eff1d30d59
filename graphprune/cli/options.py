"""Option parsing shared by commands: patterns and name filters."""

from __future__ import annotations

from graphprune.algorithms.pattern import NMPattern, Pattern, Scope, Unstructured, parse_nm
from graphprune.errors import GraphpruneError


def pattern_from_options(nm: str | None, sparsity: float | None, scope: Scope) -> Pattern:
    """``--nm`` or ``--sparsity`` (2:4 when neither is given); both only when they agree."""
    if sparsity is not None and not (0.0 <= sparsity < 1.0):
        raise GraphpruneError(f"invalid --sparsity {sparsity}: need 0 <= S < 1 (for example 0.5)")
    if nm is not None:
        pattern = parse_nm(nm)
        if sparsity is not None and abs(sparsity - pattern.sparsity) > 1e-9:
            raise GraphpruneError(
                f"--nm {pattern} means sparsity {pattern.sparsity:g}, not {sparsity:g}: give one of the two"
            )
        return pattern
    if sparsity is not None:
        return Unstructured(sparsity, scope)
    return NMPattern(2, 4)
