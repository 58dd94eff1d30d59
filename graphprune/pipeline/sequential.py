"""Sequential calibration: prune group by group, each group calibrated on the already pruned model's activations.

The reference implementations calibrate block i of a transformer on the outputs of the already pruned blocks
0..i-1. This does the same on any ONNX graph, with groups derived from the graph itself: a target's *level* is
the largest number of weight multiplications on any path from the graph inputs to its activation, and the
targets of one level form a group (in a transformer block: Q/K/V, then the attention output, then gate/up, then
down). No target of a group depends on another of the same group, so each is calibrated on activations that all
earlier groups, already pruned, produced.

Cost: every node of the graph runs once per batch, in the segment of the first group that needs it; the
tensors that later segments read (the residual stream, masks, rotary tables) are kept between segments, in
memory. So the whole run costs about one inference pass plus one small ONNX Runtime session per group.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_ir as ir

from graphprune.calibration.gram_taps import ALL_ROWS, GramSampling
from graphprune.calibration.run import Accumulator
from graphprune.calibration.session import Session, cut, values_by_name
from graphprune.calibration.stats import ActivationStats
from graphprune.calibration.taps import plan_taps, tapped_model
from graphprune.errors import GraphpruneError
from graphprune.graph.targets import Target
from graphprune.graph.types import value_types
from graphprune.passes.permute import channel_groups
from graphprune.passes.prune import Plan, PruneConfig, PrunePass, PruneResult, WeightReport, prune_result
from graphprune.pipeline.boundary import BoundaryTensors
from graphprune.pipeline.dense_targets import DenseStream
from graphprune.pipeline.progress import SILENT, PruneProgress

Feed = Mapping[str, np.ndarray]
PruneGroup = Callable[[list[Target], ActivationStats], None]
# What a sequential run calibrates and prunes at once: a block (the graph's repeating unit of levels) or a level
# (SparseGPT's "true sequential"); None where a parameter also allows one-shot.
SequentialUnit = Literal["block", "level"]
SEQUENTIAL_UNITS: tuple[SequentialUnit, ...] = ("block", "level")


def check_sequential(sequential: str | None) -> SequentialUnit | None:
    """``sequential`` as a unit, or None (one-shot); a one-line error for anything else."""
    for unit in SEQUENTIAL_UNITS:
        if sequential == unit:
            return unit
    if sequential is not None:
        raise GraphpruneError(f"unknown sequential unit {sequential!r}; choose block, level or None (one-shot)")
    return None


def target_groups(
    model: ir.Model, targets: Sequence[Target], sequential: SequentialUnit = "block"
) -> list[list[Target]]:
    """Targets grouped in dependency order: by ``level``, or by ``block`` (the graph's repeating unit of levels).

    A block is found without names: the levels' signatures (the shapes of their weights) repeat with the
    period of the model's block, e.g. Q/K/V, attention output, gate/up, down in a LLaMA decoder. Levels before
    the first repeating one, and leftovers, form groups of their own. Without a repeating unit, blocks are levels.
    """
    levels = target_levels(model, targets)
    if sequential == "level":
        return levels
    signatures = [tuple(sorted(t.shape for t in level)) for level in levels]
    period = _period(signatures)
    start = next((i for i in range(len(levels) - period) if signatures[i] == signatures[i + period]), len(levels))
    groups = [[*level] for level in levels[:start]]
    for first in range(start, len(levels), period):
        groups.append([t for level in levels[first : first + period] for t in level])
    return groups


def _period(signatures: list[tuple]) -> int:
    """The smallest period p with which at least 80% of the signatures repeat (1 when none does)."""
    n = len(signatures)
    for p in range(1, n // 2 + 1):
        matches = sum(signatures[i] == signatures[i + p] for i in range(n - p))
        if matches >= 0.8 * (n - p):
            return p
    return 1


def consumer_nodes(model: ir.Model, targets: Sequence[Target]) -> dict[ir.Node, tuple[Target, int]]:
    """Each node that multiplies by a target weight: the target and the input index the weight arrives at."""
    values = values_by_name(model.graph)
    found: dict[ir.Node, tuple[Target, int]] = {}
    for t in targets:
        for c in t.consumers:
            node = values[c.output].producer() if c.output in values else None
            if node is not None:
                found[node] = (t, c.input_index)
    return found


def target_levels(model: ir.Model, targets: Sequence[Target]) -> list[list[Target]]:
    """Targets by level (see the module docstring), in dependency order."""
    consumers = consumer_nodes(model, targets)
    depth: dict[ir.Value, int] = {}
    level: dict[str, int] = {}
    for node in model.graph:
        target, weight_index = consumers.get(node, (None, -1))
        reads = [v for i, v in enumerate(node.inputs) if v is not None and i != weight_index]
        d = max((depth.get(v, 0) for v in reads), default=0)
        if target is not None:
            level[target.name] = max(level.get(target.name, 0), d)
            d += 1
        for out in node.outputs:
            depth[out] = d
    by_level: dict[int, list[Target]] = {}
    for t in targets:
        by_level.setdefault(level.get(t.name, 0), []).append(t)
    return [by_level[k] for k in sorted(by_level)]


def constant_values(graph: ir.Graph) -> set[ir.Value]:
    """Values computed from stored tensors alone (a weight's Transpose, Cast, DequantizeLinear, a Constant).

    They are never cached between segments: after a group is pruned they change, so every segment that reads
    one computes it again from the (now pruned) stored tensors, as the model itself does on every run.
    """
    constant = {v for v in graph.initializers.values() if v not in graph.inputs}
    for node in graph:
        if all(v is None or v in constant for v in node.inputs) and not _has_subgraph(node):
            constant.update(node.outputs)
    return constant


def _has_subgraph(node: ir.Node) -> bool:
    return any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())


@dataclass
class SequentialCalibration:
    """Run a model group by group over fixed batches, pruning each group before the next is calibrated.

    ``model`` is read for every segment: a group pruned by ``prune_group`` is seen by the segments after it.
    """

    model: ir.Model
    batches: list[dict[str, np.ndarray]]
    providers: list[str]
    gram: bool = False
    sequential: SequentialUnit = "block"  # or "level": each level on the pruned levels before it
    on_group: Callable[[int, int], None] | None = None  # (groups done, groups in all)
    warnings: list[str] = field(default_factory=list)
    # Hooks of segment-wise execution (pipeline/segments.py): where boundary tensors live (spilled to disk above
    # a budget), and whether nodes downstream of a pruned group run again (False: one-shot, every group
    # calibrated on the dense model).
    store: BoundaryTensors = field(default_factory=BoundaryTensors)
    rerun_pruned: bool = True
    dense: DenseStream | None = None  # dense targets: the dense model's stream and the cross-Gram taps
    sums: bool = False  # also Σx per channel (shrink's refit solves the bias from the mean)
    sampling: GramSampling = ALL_ROWS  # the rows of the Gram matrices (shrink's strided or padded rows)

    def run(
        self, targets: Sequence[Target], prune_group: PruneGroup, groups: Sequence[list[Target]] | None = None
    ) -> int:
        """Calibrate and prune every group in order; returns the number of groups. ``groups``: the caller's own
        grouping of ``targets`` in dependency order (default: by ``sequential``); a target may be measured again
        in a later group, after its own group changed it."""
        graph = self.model.graph
        if any(_has_subgraph(node) for node in graph):
            raise GraphpruneError("`sequential` does not handle control flow (If/Loop/Scan): calibrate one-shot")
        groups = list(groups) if groups is not None else target_groups(self.model, targets, self.sequential)
        self._consumers = consumer_nodes(self.model, targets)
        self._constant = constant_values(graph)
        self._types = value_types(self.model)  # pruning changes no type: inferred once
        self._executed: set[ir.Node] = set()
        self._inputs = [v for v in graph.inputs if v.name in self.batches[0]]
        self._cache = self.store  # per-batch arrays by name
        self._held: dict[str, ir.Value] = {}  # the values whose arrays the store holds
        for v in self._inputs:
            self._held[str(v.name)] = v
            for batch in self.batches:
                self._cache.append(str(v.name), batch[str(v.name)])
        if self.dense is not None:
            self.dense.start(self.batches, list(self._held))
        try:
            for done, group in enumerate(groups):
                stats = self._calibrate(group)
                prune_group(group, stats)
                if self.on_group:
                    self.on_group(done + 1, len(groups))
        finally:
            self._cache.close()
            if self.dense is not None:
                self.dense.close()
        return len(groups)

    def _calibrate(self, group: list[Target]) -> ActivationStats:
        group_nodes = {node for node, (t, _) in self._consumers.items() if t in group}
        with plan_taps(self.model, group, self.gram, self._types, self.sums, self.sampling) as plan:
            self.warnings.extend(plan.warnings)
            wanted = [
                v for node in plan.nodes for v in node.inputs if v is not None and v.producer() not in plan.nodes
            ]
            keep = self._advance(wanted, group_nodes)
            carriers = {value: self._carrier(value) for value in self._held.values()}
            if self.dense is not None:  # the dense activations come in as inputs of the cross-Gram taps
                dense_inputs = self.dense.add_taps(self.model, plan, self._types, self.warnings)
                self.dense.open(self.model, keep, carriers)
                carriers.update(dense_inputs)
            segment = tapped_model(self.model, plan, keep, carriers)
        session = Session(segment, self.providers)
        inputs = [i.name for i in segment.proto.graph.input]
        names = [*plan.output_names, *(str(v.name) for v in keep)]
        accumulator = Accumulator(plan)
        for b in range(len(self.batches)):
            extra = self.dense.run(b, len(self.batches)) if self.dense is not None else {}  # dense activations
            feed = {name: extra[name] if name in extra else self._cache.get(name, b) for name in inputs}
            outputs = session.run(names, feed, f"a segment, batch {b + 1} of {len(self.batches)}")
            accumulator.add(outputs[: len(plan.output_names)])
            if self.dense is not None:
                self.dense.add(names, outputs)
            for value, array in zip(keep, outputs[len(plan.output_names) :], strict=True):
                self._cache.append(str(value.name), array)
                self._held[str(value.name)] = value
        del session  # the segment's weights go with it
        self._forget_consumed()
        stats = accumulator.result(group, [])
        if self.dense is not None:
            stats.dense_sums = self.dense.dense_sums(group)
            stats.cross = self.dense.result(group)
            self.dense.release(t.name for node, (t, _) in self._consumers.items() if node not in self._executed)
        return stats

    def _advance(self, activations: list[ir.Value], group_nodes: set[ir.Node]) -> list[ir.Value]:
        """Mark the nodes this segment runs for good, and return the values later segments will read.

        Within a block, later activations depend on the group's own weights, still dense here (as in the
        reference, which calibrates a whole block before pruning it): the nodes downstream of the group's
        consumers are *stale* once the group is pruned, so they run again in a later segment. Values computed
        from stored tensors alone are never kept (see :func:`constant_values`).
        """
        order = cut(self.model.graph, activations, self._held.values())
        stale: set[ir.Node] = set()
        for node in order if self.rerun_pruned else ():
            if node in group_nodes or any(v is not None and v.producer() in stale for v in node.inputs):
                stale.add(node)
        fresh = [node for node in order if node not in stale]
        self._executed.update(fresh)
        made = [v for node in fresh for v in node.outputs if v not in self._constant]
        return [v for v in made if any(use.node not in self._executed for use in v.uses())]

    def _carrier(self, value: ir.Value) -> ir.Value:
        """A typed graph input that carries ``value``'s cached arrays into a segment."""
        dtype_np, rank = self._cache.spec(str(value.name))
        dtype = ir.DataType.from_numpy(dtype_np)
        dims = [f"{value.name}_d{i}" for i in range(rank)]
        return ir.Value(name=value.name, type=ir.TensorType(dtype), shape=ir.Shape(dims))

    def _forget_consumed(self) -> None:
        """Drop cached values that no node still to run reads; graph inputs stay for later segments."""
        for name, value in list(self._held.items()):
            if value not in self._inputs and all(use.node in self._executed for use in value.uses()):
                self._cache.drop(name)
                if self.dense is not None:
                    self.dense.drop(name)
                del self._held[name]


def prune_sequentially(
    model: ir.Model,
    config: PruneConfig,
    batches: list[dict[str, np.ndarray]],
    providers: Sequence[str] = ("CPUExecutionProvider",),
    *,
    sequential: SequentialUnit = "block",
    plan: Plan | None = None,
    progress: PruneProgress = SILENT,
) -> tuple[PruneResult, list[str]]:
    """Prune ``model`` in place, each group of targets (``sequential``: by block or by level) scored on
    activations of the already pruned model.

    ``plan`` is :meth:`PrunePass.plan`'s result when the caller already has it. The segments read the weights
    from ``model`` itself, so each sees the groups pruned before it. Returns the pruning result and the
    calibration warnings.
    """
    plan = plan or PrunePass(config=config).plan(model)
    if not plan[0]:
        raise GraphpruneError("the model has no prunable weights for this pattern and selection")
    reports: list[WeightReport] = []
    gram = config.method.reconstructs
    engine = SequentialCalibration(model, batches, list(providers), gram, sequential, progress.group_done)
    groups = channel_groups(model) if config.permute else None  # the wiring: found once for every group
    engine.dense = dense_stream(model, plan[0], config, providers)

    def prune_group(group: list[Target], stats: ActivationStats) -> None:
        step = PrunePass(
            config=config, stats=stats, plan=(group, []), groups=groups, on_weight=progress.weight_pruned
        )
        reports.extend(step(model).weights)

    engine.run(plan[0], prune_group)
    return prune_result(model, config, plan, reports), engine.warnings


def dense_stream(
    model: ir.Model,
    targets: Sequence[Target],
    config: PruneConfig,
    providers: Sequence[str],
    budget: int | None = None,
) -> DenseStream | None:
    """The dense model's stream for ``config.target == "dense"`` (its boundary tensors held within ``budget``)."""
    if config.target != "dense":
        return None
    return DenseStream(model, targets, list(providers), BoundaryTensors(budget))
