"""What ``--max-memory`` can promise for one ``apply`` run, decided before any work.

The budget is honoured by the two paths that never hold the whole model, both of which need its weights in
external data files:

* a calibrated run goes segment by segment (:mod:`graphprune.pipeline.segments`), each segment's session holding
  only its own weights, the boundary activations kept within what the budget leaves;
* a run without calibration (magnitude, or statistics from ``--stats``) streams the weights, one read, pruned and
  written at a time; only the statistics and the weights in flight are in memory.

A model with inline weights is parsed whole, so no path can bound its memory: the run goes on in memory with a
warning, or stops with a one-line error when its weights alone exceed the budget. A budget below what the
streaming path holds at once (the statistics and the largest weight) is an error too.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphprune.errors import GraphpruneError
from graphprune.graph.model_io import uses_external_data, weight_bytes
from graphprune.graph.targets import Target
from graphprune.pipeline.boundary import format_size as _size

_INLINE_HINT = "save it with external data (onnx.save_model(..., save_as_external_data=True)) to bound its memory"


def budget_warnings(
    model: ir.Model,
    path: Path,
    max_memory: int | None,
    calibrated: bool,
    targets: list[Target],
    stats_bytes: int = 0,
) -> list[str]:
    """The warnings ``--max-memory`` gives for this run; raises GraphpruneError when it cannot be kept at all."""
    if max_memory is None:
        return []
    if not uses_external_data(model):
        weights = weight_bytes(model)
        if weights > max_memory:
            raise GraphpruneError(
                f"`max_memory={_size(max_memory)}` cannot hold {path.name}: its {_size(weights)} of weights are "
                f"stored inline and load whole; {_INLINE_HINT}"
            )
        return [
            f"`max_memory` is not enforced for {path.name}: its weights are stored inline ({_size(weights)}), "
            f"so it is pruned in memory; {_INLINE_HINT}"
        ]
    if calibrated:
        return []  # segment-wise: pipeline/segments.py splits the budget (and warns when it must spill all)
    stored = model.graph.initializers
    largest = max((_nbytes(stored[t.name]) for t in targets if t.name in stored), default=0)
    if stats_bytes + largest > max_memory:
        raise GraphpruneError(
            f"`max_memory={_size(max_memory)}` is below what pruning holds at once: the statistics "
            f"({_size(stats_bytes)}) and the largest weight ({_size(largest)})"
        )
    return []


def statistics_bytes(stats: object) -> int:
    """Bytes of the arrays of saved statistics (``ActivationStats`` or a plain mapping of arrays)."""
    if stats is None:
        return 0
    if isinstance(stats, Mapping):
        return sum(np.asarray(a).nbytes for a in stats.values())
    tables = (getattr(stats, "sumsq", {}), getattr(stats, "gram", {}))
    arrays = {id(a): a for table in tables for a in table.values()}  # inputs shared by weights share a Gram
    return sum(np.asarray(a).nbytes for a in arrays.values())


def _nbytes(value: ir.Value) -> int:
    return value.const_value.nbytes if value.const_value is not None else 0
