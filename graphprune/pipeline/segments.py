"""Segment-wise pruning with bounded memory, for models whose weights live in external data files.

The graph runs segment by segment (a segment: the nodes one group of the sequential planner needs, see
:mod:`graphprune.pipeline.sequential`), and no step ever holds the whole model:

* each segment's ONNX Runtime session holds only the weights its nodes read (the sequential engine's sessions
  read stored weights in place): the input's from its data files, weights already pruned as memory maps of the
  output's data file; the session and the maps are released when the segment is done;
* the tensors that cross segment boundaries are the only activations kept, in a
  :class:`~graphprune.pipeline.boundary.BoundaryTensors` that spills them to disk above the memory budget;
* each target is read from the input, pruned and appended to the output's data file right after its group is
  calibrated; the weights left dense are copied over a chunk at a time at the end; the output is committed (data
  file, then model) only when everything succeeded.

``sequential``: ``block`` and ``level`` calibrate each group on the already pruned groups before it, exactly as
the in-memory engine does; None (one-shot) calibrates every group on the dense model, as a plain one-shot
calibration does, with the same bounded memory.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphprune.algorithms.pattern import NMPattern
from graphprune.calibration.providers import resolve_providers
from graphprune.calibration.request import CalibrationRequest
from graphprune.calibration.stats import ActivationStats
from graphprune.errors import GraphpruneError
from graphprune.graph.stored import replace_tensor, stored_tensor, stored_values
from graphprune.graph.targets import Target
from graphprune.passes.permute import ChannelGroups, PermutePass, channel_groups
from graphprune.passes.prune import Plan, PruneConfig, PrunePass, PruneResult, WeightReport, prune_result
from graphprune.pipeline.boundary import BoundaryTensors
from graphprune.pipeline.progress import SILENT, PruneProgress, SegmentProgress
from graphprune.pipeline.sequential import (
    SequentialCalibration,
    SequentialUnit,
    check_sequential,
    dense_stream,
    target_groups,
)
from graphprune.pipeline.streaming import StagedOutput

# What one segment costs beyond its weights on disk: ONNX Runtime's copy (pre-packed MatMul weights) and the
# pruning step's copies of one weight. Used to split --max-memory between segments and boundary tensors.
_SEGMENT_OVERHEAD = 3


@dataclass
class SegmentReport:
    """What the run did besides pruning: the memory split and what was spilled."""

    budget_bytes: int | None  # boundary tensors held in memory at most (None: no limit)
    peak_held_bytes: int = 0
    spilled_bytes: int = 0
    spilled: list[str] = field(default_factory=list)


def boundary_budget(
    model: ir.Model,
    targets: list[Target],
    sequential: SequentialUnit | None,
    max_memory: int | None,
    sessions: int = 1,
) -> int | None:
    """The bytes of boundary tensors to keep in memory: ``max_memory`` less what the largest segment needs
    (``sessions``: open at once per segment; dense targets run the dense model's segment beside the pruned one)."""
    if max_memory is None:
        return None
    sizes = {
        name: v.const_value.nbytes for name, v in model.graph.initializers.items() if v.const_value is not None
    }
    groups = target_groups(model, targets, sequential or "block")
    largest_group = max((sum(sizes.get(t.name, 0) for t in g) for g in groups), default=0)
    segment = (_SEGMENT_OVERHEAD + sessions - 1) * max(largest_group, max(sizes.values(), default=0))
    return max(max_memory - segment, 0)


def prune_in_segments(
    model: ir.Model,
    base_dir: Path,
    output: Path,
    config: PruneConfig,
    calibration: CalibrationRequest,
    sequential: SequentialUnit | None,
    plan: Plan,
    *,
    progress: PruneProgress = SILENT,
    staged: StagedOutput | None = None,
) -> tuple[PruneResult, list[str], SegmentReport]:
    """Prune ``model`` (its external tensors read lazily from their files) into ``output``.

    ``base_dir`` is the input's directory. Returns the pruning result, the calibration warnings and the memory
    report. Nothing is written at ``output`` unless everything succeeds. With ``staged`` given, the output is
    left staged there (``staged.model`` set) for the caller to commit with its other files.
    """
    sequential = check_sequential(sequential)
    targets = plan[0]
    if config.permute and sequential is None:
        # One-shot segments keep running the dense weights, so a writer reordered after it was written could not
        # be reordered in the output the same way; sequential runs can (see _Run._permute).
        raise GraphpruneError(
            "`permute` with a one-shot segment-wise run (`max_memory` without `sequential`) is not supported: "
            "add `sequential`, or drop `max_memory`"
        )
    if config.target == "dense" and sequential is None:
        raise GraphpruneError("dense targets reconstruct on the pruned prefix: they need a sequential mode")
    providers = resolve_providers(calibration.provider)  # a missing provider fails before any work
    batches, warnings = calibration.batches(model)
    shares = 2 if config.target == "dense" else 1  # dense targets: a second session and stream of boundary tensors
    budget = boundary_budget(model, targets, sequential, calibration.max_memory, shares)
    if budget == 0:
        warnings.append(
            "`max_memory` is below what the largest segment needs: every boundary tensor is spilled to disk"
        )
    store = BoundaryTensors(None if budget is None else budget // shares)
    own = staged is None
    with contextlib.nullcontext(staged) if staged is not None else StagedOutput(output) as staged:
        run = _Run(model, staged, config, store, progress, pruned_feeds_later=sequential is not None)
        run.groups = channel_groups(model) if config.permute else None
        run.batch_tokens = sum(_tokens(batch) for batch in batches)
        engine = SequentialCalibration(
            model,
            batches,
            providers,
            config.method.reconstructs,  # SparseGPT and ALPS read Gram matrices
            sequential or "block",  # one-shot: the segments of blocks, each calibrated on the dense model
            run.on_group,
            store=store,
            rerun_pruned=sequential is not None,
            dense=dense_stream(model, targets, config, providers, store.budget),
        )
        run.start()
        engine.run(targets, run.prune_group)
        run.finish()
        staged.model = ir.to_proto(model)  # every large tensor points into the staged data file
        if own:
            staged.commit(staged.model)
    memory = SegmentReport(budget, store.peak_held_bytes, store.spilled_bytes, sorted(store.spilled))
    return prune_result(model, config, plan, run.reports), warnings + engine.warnings, memory


@dataclass
class _Run:
    """The state of one segment-wise run: where each weight is, and the segments' timing."""

    model: ir.Model
    staged: StagedOutput
    config: PruneConfig
    store: BoundaryTensors
    progress: PruneProgress
    pruned_feeds_later: bool = True  # sequential: later segments read the pruned weights; one-shot: dense ones
    reports: list[WeightReport] = field(default_factory=list)
    batch_tokens: int = 0  # tokens of all calibration batches: what every segment runs
    groups: ChannelGroups | None = None  # --permute: the graph's channel groups
    _written: dict[str, ir.ExternalTensor] = field(default_factory=dict)  # pruned weights in the output
    _segment_started: float = 0.0
    _pruning_seconds: float = 0.0

    def start(self) -> None:
        self._segment_started = time.perf_counter()

    def prune_group(self, group: list[Target], stats: ActivationStats) -> None:
        """Prune each target of ``group`` and stream it into the output's data file at once (one target per
        pass: one pruned weight in memory)."""
        started = time.perf_counter()
        stored = stored_values(self.model.graph)
        config = replace(self.config, permute=False)  # the orders are written below, target by target
        for target in group:
            value = stored[target.name]
            dense = stored_tensor(value)  # a lazy view of the input's bytes
            if self.groups is not None and target.name in self.groups[0]:
                self._permute(target, stats, stored)
            step = PrunePass(
                config=config, stats=stats, plan=([target], []), on_weight=self.progress.weight_pruned
            )
            self.reports.extend(step(self.model).weights)
            if not isinstance(dense, ir.ExternalTensor):  # small inline weights stay in the model
                continue
            pruned = stored_tensor(value)
            written = self._write(str(value.name), pruned.tobytes(), pruned)
            self._written[target.name] = written
            # sequential: later segments run the pruned weight (mapped from the output); one-shot: the dense one
            replace_tensor(value, written if self.pruned_feeds_later else dense)
        self._pruning_seconds += time.perf_counter() - started

    def _permute(self, reader: Target, stats: ActivationStats, stored: Mapping[str, ir.Value]) -> None:
        """--permute chooses a group's channel order when its reader is pruned, after its writers (an MLP's up
        and gate columns) were already pruned and written: write their new order over their old bytes (same
        length, same place) and point the model at the file again instead of keeping the copy in memory."""
        assert isinstance(self.config.pattern, NMPattern)
        step = PermutePass(
            pattern=self.config.pattern, method=self.config.method, stats=stats, readers=[reader.name],
            groups=self.groups,
        )  # fmt: skip
        for name in step(self.model).rewritten:
            written = self._written.get(name)
            if written is None:
                continue
            tensor = stored_tensor(stored[name])
            self.staged.rewrite_bytes(written.offset or 0, tensor.tobytes())
            fresh = self._pointer(name, written.offset or 0, written.nbytes, tensor)  # no stale mapping
            self._written[name] = fresh
            replace_tensor(stored[name], fresh)

    def on_group(self, done: int, total: int) -> None:
        for value in self.model.graph.initializers.values():  # unmap what the segment read
            if isinstance(value.const_value, ir.ExternalTensor):
                value.const_value.release()
        seconds = time.perf_counter() - self._segment_started - self._pruning_seconds
        rate = self.batch_tokens / seconds if self.batch_tokens and seconds > 0 else None
        self.progress.segment_done(SegmentProgress(done, total, rate, resident_bytes(), self.store.spilled_bytes))
        self._segment_started, self._pruning_seconds = time.perf_counter(), 0.0

    def finish(self) -> None:
        """Point pruned weights at the output and copy every weight left dense into its data file."""
        for name, value in stored_values(self.model.graph).items():
            tensor = stored_tensor(value)
            if name in self._written:
                replace_tensor(value, self._written[name])
            elif isinstance(tensor, ir.ExternalTensor):
                source = Path(tensor.base_dir) / tensor.location
                offset, length = self.staged.copy_range(source, tensor.offset or 0, tensor.nbytes)
                replace_tensor(value, self._pointer(name, offset, length, tensor))

    def _write(self, name: str, data: bytes, like: ir.TensorProtocol) -> ir.ExternalTensor:
        offset, length = self.staged.append_bytes(data)
        return self._pointer(name, offset, length, like)

    def _pointer(self, name: str, offset: int, length: int, like: ir.TensorProtocol) -> ir.ExternalTensor:
        """A tensor in the staged data file (its location is relative: right once the output is committed)."""
        return ir.ExternalTensor(
            self.staged.data_name,
            offset,
            length,
            like.dtype,
            shape=ir.Shape(like.shape.numpy()),
            name=name,
            base_dir=self.staged.staging,
        )


def _tokens(feed: Mapping[str, np.ndarray]) -> int:
    """Tokens in a feed: the size of its first integer [batch, sequence] input (0 for other models)."""
    for value in feed.values():
        if value.ndim == 2 and np.issubdtype(value.dtype, np.integer):
            return int(value.size)
    return 0


def resident_bytes() -> int:
    """This process's resident set size (Linux; 0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
