"""What graphprune's passes share with ``onnx_ir.passes``: condition errors that are also one-line errors, the
statistics the passes read, and a ``Sequential`` that lets graphprune's errors through.

A pass subclasses ``ir.passes.InPlacePass`` or ``ir.passes.FunctionalPass``; calling it (``pass_(model)``)
checks ``requires`` before and ``ensures`` after ``call`` and enforces the in-place declaration. A pass holds
only its configuration (keyword-only constructor arguments): everything one run computes lives in objects made
inside ``call``, so an instance can be applied to any number of models, also by a ``PassManager``. Conditions
raise the errors below, which onnx-ir lets through unwrapped and the command line prints as one line.

Passes compose with ``ir.passes.Sequential``, which wraps any error of an inner pass in a ``PassError`` named
after the pass; :class:`Sequential` here re-raises graphprune's own errors as they were raised.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np
import onnx_ir as ir

from graphprune.errors import GraphpruneError


class PassPreconditionError(GraphpruneError, ir.passes.PreconditionError):
    """A pass cannot run on this model with these inputs (missing statistics, nothing to do...)."""


class PassPostconditionError(GraphpruneError, ir.passes.PostconditionError):
    """A pass ran but its result breaks its promise (an N:M group with too many non-zeros)."""


class Statistics(Protocol):
    """What calibration gives the scores: Σx² per input channel, and Gram matrices XᵀX for SparseGPT."""

    @property  # read-only: a dataclass's dict fields match it
    def sumsq(self) -> Mapping[str, np.ndarray]: ...
    @property
    def gram(self) -> Mapping[str, np.ndarray]: ...


StatisticsInput = Statistics | Mapping[str, np.ndarray] | None


def statistics_parts(stats: StatisticsInput) -> tuple[Mapping[str, np.ndarray] | None, Mapping[str, np.ndarray]]:
    """Σx² per weight (None without statistics) and the Gram matrices ({} when there are none); a plain mapping
    is Σx² alone (what Wanda needs)."""
    if stats is None:
        return None, {}
    if isinstance(stats, Mapping):
        return stats, {}
    return stats.sumsq, stats.gram


def describe_statistics(stats: StatisticsInput) -> str:
    """A short text for a pass's ``repr``: which statistics it holds, not their values."""
    sumsq, gram = statistics_parts(stats)
    if sumsq is None:
        return "None"
    return f"<{len(sumsq)} weights{f', {len(gram)} Gram matrices' if gram else ''}>"


# A channel permutation written into a weight's K axis (passes/permute.py) is recorded in the weight value's
# ``meta`` (onnx-ir's in-memory store for passes' analyses, never saved): the weight's K in terms of the channel
# order the statistics were measured in, and the permutation's report.
CHANNEL_ORDER = "graphprune.channel_order"
PERMUTATION_REPORT = "graphprune.permutation"
# The joint prune-and-quantize mode records the solver's codes and scales of a weight there too (canonical
# ``(out, K)`` codes, ``(out, n_blocks)`` float32 scales): the Q/DQ writer stores them as they are.
GRID_CODES = "graphprune.grid_codes"


def channel_order(value: ir.Value) -> np.ndarray | None:
    """The order of the weight's K written by a permutation (new channel i is measured channel ``order[i]``)."""
    return value.meta.get(CHANNEL_ORDER)


def sumsq_in_model_order(value: ir.Value, sumsq: np.ndarray) -> np.ndarray:
    """Σx² of this weight's input channels in the order the model now has (after any permutation)."""
    order = channel_order(value)
    return sumsq if order is None else sumsq[order]


def gram_in_model_order(value: ir.Value, gram: np.ndarray) -> np.ndarray:
    order = channel_order(value)
    return gram if order is None else gram[np.ix_(order, order)]


def graphprune_error(error: BaseException) -> GraphpruneError | None:
    """The graphprune error behind an onnx-ir ``PassError`` (its chain of causes), or None."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, GraphpruneError):
            return seen
        seen = seen.__cause__
    return None


class Sequential(ir.passes.Sequential):
    """``ir.passes.Sequential`` whose graphprune errors reach the caller as raised (onnx-ir wraps every error of
    an inner pass in a ``PassError`` whose message is the pass's ``repr``)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        try:
            return super().call(model)
        except ir.passes.PassError as error:
            cause = graphprune_error(error)
            if cause is None:
                raise
            raise cause from cause.__cause__  # the error as raised, without onnx-ir's wrapper

    def __repr__(self) -> str:
        return f"Sequential({', '.join(repr(p) for p in self.passes)})"
