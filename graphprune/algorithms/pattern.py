"""Sparsity patterns: N:M (``keep`` of every ``group`` along K) or unstructured with a comparison scope."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from graphprune.errors import GraphpruneError


class Scope(str, Enum):
    """Which weights an unstructured mask compares with each other."""

    OUTPUT = "output"  # each output neuron (a row of the (out, K) layout), as Wanda
    LAYER = "layer"  # the whole weight, as classic magnitude pruning
    INPUT = "input"  # each input channel (a column of the (out, K) layout)


@dataclass(frozen=True)
class NMPattern:
    """At most ``keep`` non-zeros in every ``group`` consecutive weights along the reduction axis K."""

    keep: int
    group: int

    def __post_init__(self) -> None:
        if not (0 < self.keep < self.group):
            raise GraphpruneError(
                f"invalid N:M pattern {self.keep}:{self.group}: need 0 < N < M (for example 2:4)"
            )

    @property
    def sparsity(self) -> float:
        return 1.0 - self.keep / self.group

    def __str__(self) -> str:
        return f"{self.keep}:{self.group}"


@dataclass(frozen=True)
class Unstructured:
    """Zero a fraction ``sparsity`` of the weights, compared within ``scope``."""

    sparsity: float
    scope: Scope = Scope.OUTPUT

    def __post_init__(self) -> None:
        if not (0.0 <= self.sparsity < 1.0):
            raise GraphpruneError(f"invalid sparsity {self.sparsity}: need 0 <= S < 1 (for example 0.5)")

    def __str__(self) -> str:
        return "unstructured"


Pattern = NMPattern | Unstructured

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_nm(text: str) -> NMPattern:
    """Parse ``"2:4"`` into an :class:`NMPattern`, with a one-line error for anything else."""
    match = _NM_RE.match(text)
    if not match:
        raise GraphpruneError(f"invalid N:M pattern {text!r} (`nm`): expected N:M with integers, for example 2:4")
    return NMPattern(int(match.group(1)), int(match.group(2)))
