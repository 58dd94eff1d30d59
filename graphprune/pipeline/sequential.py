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
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from graphprune.algorithms.scores import Method
from graphprune.calibration.providers import import_ort, session_options
from graphprune.calibration.run import Accumulator
from graphprune.calibration.stats import ActivationStats
from graphprune.calibration.taps import plan_taps, tapped
from graphprune.errors import GraphpruneError
from graphprune.graph.model_io import to_proto
from graphprune.graph.stored import stored_tensor, stored_values
from graphprune.graph.targets import Skip, Target, node_labels
from graphprune.passes.prune import PruneConfig, PrunePass, PruneResult, WeightReport

Feed = Mapping[str, np.ndarray]
PruneGroup = Callable[[list[Target], ActivationStats], None]


def target_groups(model: onnx.ModelProto, targets: Sequence[Target], by: str = "block") -> list[list[Target]]:
    """Targets grouped in dependency order: by ``level``, or by ``block`` (the graph's repeating unit of levels).

    A block is found without names: the levels' signatures (the shapes of their weights) repeat with the
    period of the model's block, e.g. Q/K/V, attention output, gate/up, down in a LLaMA decoder. Levels before
    the first repeating one, and leftovers, form groups of their own. Without a repeating unit, blocks are levels.
    """
    levels = target_levels(model, targets)
    if by == "level":
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


def target_levels(model: onnx.ModelProto, targets: Sequence[Target]) -> list[list[Target]]:
    """Targets by level (see the module docstring), in dependency order."""
    graph = model.graph
    labels = node_labels(graph.node)
    consumer_of = {c.node: t.name for t in targets for c in t.consumers}
    weights = {c.node: c.input_index for t in targets for c in t.consumers}
    depth: dict[str, int] = {}
    level: dict[str, int] = {}
    for label, node in zip(labels, graph.node, strict=True):
        reads = [i for idx, i in enumerate(node.input) if i and weights.get(label) != idx]
        d = max((depth.get(i, 0) for i in reads), default=0)
        if label in consumer_of:
            name = consumer_of[label]
            level[name] = max(level.get(name, 0), d)
            d += 1
        for out in node.output:
            depth[out] = d
    by_level: dict[int, list[Target]] = {}
    for t in targets:
        by_level.setdefault(level.get(t.name, 0), []).append(t)
    return [by_level[k] for k in sorted(by_level)]


@dataclass
class _Segment:
    """The nodes one group needs that have not run yet, as a model of their own."""

    model: onnx.ModelProto
    inputs: list[str]  # cached tensors (or graph inputs) it reads
    keep: list[str]  # its outputs that later segments read


@dataclass
class SequentialCalibration:
    """Run a model group by group over fixed batches, pruning each group before the next is calibrated."""

    model: onnx.ModelProto
    batches: list[dict[str, np.ndarray]]
    providers: list[str]
    gram: bool = False
    group_by: str = "block"  # or "level": each level on the pruned levels before it ("true sequential")
    on_group: Callable[[int, int], None] | None = None  # (groups done, groups in all)
    warnings: list[str] = field(default_factory=list)

    def run(self, targets: Sequence[Target], prune_group: PruneGroup) -> int:
        """Calibrate and prune every group in order; returns the number of groups."""
        graph = self.model.graph
        subgraphs = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        if any(a.type in subgraphs for n in graph.node for a in n.attribute):
            raise GraphpruneError("--sequential does not handle control flow (If/Loop/Scan): calibrate one-shot")
        groups = target_groups(self.model, targets, self.group_by)
        self._executed: set[int] = set()
        self._cache: dict[str, list[np.ndarray]] = {
            name: [batch[name] for batch in self.batches] for name in self.batches[0]
        }
        self._producer = {out: i for i, n in enumerate(graph.node) for out in n.output}
        self._readers: dict[str, list[int]] = {}
        for i, node in enumerate(graph.node):
            for name in node.input:
                self._readers.setdefault(name, []).append(i)
        self._stored = {t.name for t in graph.initializer}
        self._labels = node_labels(graph.node)
        for done, group in enumerate(groups):
            stats = self._calibrate(group)
            prune_group(group, stats)
            if self.on_group:
                self.on_group(done + 1, len(groups))
        return len(groups)

    def _calibrate(self, group: list[Target]) -> ActivationStats:
        activations = [c.activation for t in group for c in t.consumers]
        consumers = {c.node for t in group for c in t.consumers}
        segment = self._segment(activations, {i for i, label in enumerate(self._labels) if label in consumers})
        plan = plan_taps(segment.model, group, gram=self.gram)
        self.warnings.extend(plan.warnings)
        with tapped(segment.model, plan) as model:
            for name in segment.keep:
                model.graph.output.append(helper.make_empty_tensor_value_info(name))
            session = self._session(model.SerializeToString())
        names = [*plan.output_names, *segment.keep]
        accumulator = Accumulator(plan)
        kept: dict[str, list[np.ndarray]] = {name: [] for name in segment.keep}
        for b in range(len(self.batches)):
            feed = {name: self._cache[name][b] for name in segment.inputs}
            outputs = session.run(names, feed)
            accumulator.add(outputs[: len(plan.output_names)])
            for name, value in zip(segment.keep, outputs[len(plan.output_names) :], strict=True):
                kept[name].append(value)
        self._cache.update(kept)
        self._forget_consumed()
        return accumulator.result(group, [])

    def _segment(self, activations: list[str], group_nodes: set[int]) -> _Segment:
        """The not-yet-run nodes that compute ``activations`` from the cache, with what to keep afterwards.

        Within a block, later activations depend on the group's own weights, still dense here (as in the
        reference, which calibrates a whole block before pruning it): the nodes downstream of the group's
        consumers are *stale* once the group is pruned, so they run again in a later segment.
        """
        graph = self.model.graph
        needed: set[int] = set()
        stack = [a for a in activations if a not in self._cache]
        while stack:
            name = stack.pop()
            index = self._producer.get(name)
            if name in self._cache or name in self._stored or index is None or index in needed:
                continue
            needed.add(index)
            stack.extend(i for i in graph.node[index].input if i)
        order = sorted(needed)
        nodes = [graph.node[i] for i in order]
        reads = {i for n in nodes for i in n.input if i}
        inputs = sorted(r for r in reads | set(activations) if r in self._cache)  # a tap may read a cached one
        stale: set[int] = set()
        for i in order:
            node = graph.node[i]
            if i in group_nodes or any(self._producer.get(x) in stale for x in node.input if x):
                stale.add(i)
        fresh = needed - stale
        self._executed |= fresh
        made = {o for i in fresh for o in graph.node[i].output}
        keep = sorted(name for name in made if any(r not in self._executed for r in self._readers.get(name, [])))
        sub = helper.make_graph(
            nodes,
            "segment",
            [self._value_info(name) for name in inputs],
            [],
            [t for t in graph.initializer if t.name in reads],
        )
        model = helper.make_model(sub, opset_imports=list(self.model.opset_import))
        model.ir_version = self.model.ir_version
        model.functions.extend(self.model.functions)
        return _Segment(model, inputs, keep)

    def _value_info(self, name: str) -> onnx.ValueInfoProto:
        first = self._cache[name][0]
        dims = [f"{name}_d{i}" for i in range(first.ndim)]
        return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(first.dtype), dims)

    def _forget_consumed(self) -> None:
        """Drop cached tensors that no node still to run reads; graph inputs stay for later segments."""
        for name in list(self._cache):
            readers = self._readers.get(name, [])
            if name not in self.batches[0] and all(r in self._executed for r in readers):
                del self._cache[name]

    def _session(self, model_bytes: bytes) -> Any:
        ort = import_ort()
        try:
            return ort.InferenceSession(model_bytes, session_options(), providers=self.providers)
        except Exception as exc:
            raise GraphpruneError(f"onnxruntime cannot run a segment: {str(exc).splitlines()[0]}") from None


def prune_sequentially(
    model: ir.Model,
    config: PruneConfig,
    batches: list[dict[str, np.ndarray]],
    providers: Sequence[str] = ("CPUExecutionProvider",),
    on_group: Callable[[int, int], None] | None = None,
    on_weight: Callable[[str], None] | None = None,
    group_by: str = "block",
    plan: tuple[list[Target], list[Skip]] | None = None,
    proto: onnx.ModelProto | None = None,
) -> tuple[PruneResult, list[str]]:
    """Prune ``model`` in place, each group of targets scored on activations of the already pruned model.

    ``plan`` is :meth:`PrunePass.plan`'s result when the caller already has it; ``proto`` is the model as one
    protobuf with its weights (made here when not given), which the segments run from. Returns the pruning
    result and the calibration warnings.
    """
    proto = proto if proto is not None else to_proto(model)
    targets, skips = plan or PrunePass(config).plan(model)
    if not targets:
        raise GraphpruneError("the model has no prunable weights for this pattern and selection")
    reports = [WeightReport(s.name, s.op, skipped=s.reason) for s in skips]
    gram = config.method is Method.SPARSEGPT
    engine = SequentialCalibration(proto, batches, list(providers), gram, group_by, on_group)

    def prune_group(group: list[Target], stats: ActivationStats) -> None:
        step = PrunePass(config, stats, on_weight)
        step.check_statistics(group)
        reports.extend(step.prune_targets(model, group))
        _copy_into_proto(model, proto, group)

    engine.run(targets, prune_group)
    reports.sort(key=lambda r: (r.skipped is not None, r.name))
    return PruneResult(model, bool(targets), config, reports), engine.warnings


def _copy_into_proto(model: ir.Model, proto: onnx.ModelProto, group: list[Target]) -> None:
    """The pruned tensors of ``group``, from the onnx-ir model into the protobuf the next segments run from."""
    stored = stored_values(model.graph)
    places = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            places.setdefault(node.output[0], node.attribute[0].t)
    for target in group:
        places[target.name].CopyFrom(ir.serde.serialize_tensor(stored_tensor(stored[target.name])))
