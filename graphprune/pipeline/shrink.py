"""Structured pruning end to end: remove blocks, then shrink groups in one or more calibrated rounds.

:func:`shrink_model` works on an ``onnx_ir.Model`` in place; :func:`shrink_file` reads a file, shrinks it and
writes the smaller model and its JSON report (nothing is written when anything fails; the input is never touched).
Order: blocks first (ShortGPT measures every block's influence on the dense model once, then the lowest go), then
``steps`` rounds that each remove an equal share of the units, re-calibrating the shrunk model before each round
when the method uses data. Each round either removes the same fraction of every group (uniform) or shares one
budget per unit kind across the groups on standardised scores (global, FLAP's adaptive structure:
:mod:`graphprune.algorithms.allocation`); then, with the refit, every consumer of removed channels gets the
least-squares weights and bias on the channels it keeps (:mod:`graphprune.algorithms.refit`), from the Gram matrix
and mean of its input measured in that round, on the model as the earlier rounds left it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphprune.algorithms import structured as st
from graphprune.algorithms.allocation import allocate
from graphprune.algorithms.dense_target import blended_cross
from graphprune.algorithms.refit import greedy_costs, moments_from_sums, refit
from graphprune.algorithms.structured import StructuredMethod
from graphprune.calibration.gram_taps import GramSampling
from graphprune.calibration.moments import ChannelTap, Moments, collect_moments
from graphprune.calibration.request import CalibrationRequest
from graphprune.errors import GraphpruneError
from graphprune.graph.blocks import bypass_blocks, find_blocks
from graphprune.graph.groups import Group, GroupSkip, Slot, find_groups
from graphprune.graph.prepare import prepare_graph
from graphprune.passes.shrink import Removal, ShrinkPass, parameter_count
from graphprune.pipeline.block_refit import REFIT_SCOPES
from graphprune.pipeline.shrink_stream import DenseMoments, shrink_streamed, stream_targets

UNIT_KINDS = ("mlp", "heads", "channels")
ALLOCATIONS = ("uniform", "global", "error")  # error: global on raw scores, not standardised
TARGETS = ("pruned", "dense")  # what the refit reconstructs: the shrunk model's own outputs or the dense model's

ChannelSums = tuple[np.ndarray, np.ndarray, int]  # a consumer input's Σx, Σx² and rows


@dataclass(frozen=True, kw_only=True)
class ShrinkConfig:
    """What to remove: ``ratio`` of every group's units (of the ``units`` kinds) and ``blocks`` whole blocks."""

    ratio: float | None = None
    units: tuple[str, ...] = UNIT_KINDS
    method: StructuredMethod = StructuredMethod.L2
    blocks: int = 0
    steps: int = 1
    round_to: int = 1  # leave a multiple of this many channels in every group's layers (neurons, heads' channels)
    # per-layer ratios: (shell pattern on the group name, ratio in [0, 1)); the first match wins over ``ratio``
    overrides: tuple[tuple[str, float], ...] = ()
    refit: bool | None = None  # least-squares refit of the consumers; None: on when calibration data is given
    damp: float = 0.01  # the refit's damping, a fraction of the mean diagonal of the input's Gram matrix
    allocate: str | None = None  # "uniform" or "global"; None: global when calibration data is given
    ratio_min: float = 0.0  # global allocation: the least and most any one group loses
    ratio_max: float = 0.8
    sequential: bool = False  # one group at a time in graph order, each measured on the already shrunk prefix
    gram_stride: int = 1  # the refit's Gram matrices from every n-th calibration row: 1/n of their cost
    # where an attention mask marks padded tokens, every n-th padded row in the Gram matrices, weighted n (0: none;
    # 1: every row): padded positions of one text differ little, and 8 kept all-MiniLM-L6's mean cosine
    pad_stride: int = 8
    # global allocation: the scores that share the budget across groups (None: ``method``'s, which also choose
    # the units inside each group)
    allocate_by: StructuredMethod | None = None
    # sequential refit: fit the shrunk prefix's inputs to the "pruned" (shrunk) model's own outputs, or to the
    # "dense" model's (cross moments from a dense stream beside the shrunk one); ``target_blend`` of the dense
    target: str = "pruned"
    target_blend: float = 1.0
    # with dense targets: refit only the "consumers" of removed channels, or "all" linear layers of the blocks
    # (the ones that lose nothing too, towards the dense outputs: whole-block reconstruction)
    refit_scope: str = "consumers"

    def resolved(self, has_data: bool) -> ShrinkConfig:
        """The defaults that depend on whether calibration data is given, made explicit."""
        refit = has_data if self.refit is None else self.refit
        allocate = self.allocate or ("global" if has_data else "uniform")
        return replace(self, refit=refit, allocate=allocate)

    def pooled(self, group_name: str) -> bool:
        """Whether the group shares the global budget: no ``overrides`` pattern gives it its own ratio."""
        return not any(fnmatch.fnmatchcase(group_name, pattern) for pattern, _ in self.overrides)

    def ratio_for(self, group_name: str) -> float:
        for pattern, ratio in self.overrides:
            if fnmatch.fnmatchcase(group_name, pattern):
                return ratio
        assert self.ratio is not None
        return self.ratio

    def validate(self) -> None:
        if self.ratio is None and not self.blocks:
            raise GraphpruneError("nothing to remove: give `ratio` R (0 < R < 1) and/or `blocks` N")
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            raise GraphpruneError(f"invalid `ratio` {self.ratio}: need 0 < R < 1 (for example 0.25)")
        for pattern, ratio in self.overrides:
            if not 0.0 <= ratio < 1.0:
                raise GraphpruneError(f"invalid `ratio_for` {pattern}={ratio}: need 0 <= R < 1")
        if self.overrides and self.ratio is None:
            raise GraphpruneError("`ratio_for` needs `ratio` for the groups it does not name")
        if self.blocks < 0:
            raise GraphpruneError(f"invalid `blocks` {self.blocks}: need N >= 0")
        if self.steps < 1:
            raise GraphpruneError(f"invalid `steps` {self.steps}: need K >= 1")
        if self.round_to < 1:
            raise GraphpruneError(f"invalid `round_to` {self.round_to}: need N >= 1")
        unknown = set(self.units) - set(UNIT_KINDS)
        if unknown or not self.units:
            raise GraphpruneError(f"invalid `units` {','.join(self.units)}: choose from {','.join(UNIT_KINDS)}")
        if self.allocate is not None and self.allocate not in ALLOCATIONS:
            raise GraphpruneError(f"invalid allocation {self.allocate!r}: choose from {', '.join(ALLOCATIONS)}")
        if not 0.0 <= self.ratio_min <= self.ratio_max < 1.0:
            raise GraphpruneError(
                f"invalid per-layer bounds {self.ratio_min:g}..{self.ratio_max:g}: need 0 <= least <= most < 1"
            )
        if self.gram_stride < 1:
            raise GraphpruneError(f"invalid Gram stride {self.gram_stride}: need n >= 1")
        if self.pad_stride < 0:
            raise GraphpruneError(f"invalid padding stride {self.pad_stride}: need n >= 0 (0: no padded rows)")
        if self.allocate_by is StructuredMethod.L2 and self.method is not StructuredMethod.L2:
            raise GraphpruneError("`allocate_by=l2` with a calibrated `method`: allocate by a calibrated score")
        if self.sequential and self.steps > 1:
            raise GraphpruneError("sequential shrinking works one group at a time: it takes no rounds (steps)")
        if self.target not in TARGETS:
            raise GraphpruneError(f"invalid refit target {self.target!r}: choose from {', '.join(TARGETS)}")
        if self.target == "dense" and not (self.sequential and self.refit is not False):
            raise GraphpruneError(
                "`target=dense` refits on the shrunk prefix: it needs `sequential` and the refit"
            )
        if self.refit_scope not in REFIT_SCOPES:
            raise GraphpruneError(f"invalid refit scope {self.refit_scope!r}: choose {' or '.join(REFIT_SCOPES)}")
        if self.refit_scope == "all" and self.target != "dense":
            raise GraphpruneError("`refit_scope=all` refits the layers that lose nothing towards the dense "
                                  "outputs: it needs `target=dense`")  # fmt: skip
        if not 0.0 <= self.target_blend <= 1.0:
            raise GraphpruneError(f"invalid `target_blend` {self.target_blend:g}: need 0 <= a <= 1")
        if not 0.0 <= self.damp < 1e6:
            raise GraphpruneError(f"invalid refit damping {self.damp:g}: need a fraction >= 0 (for example 0.01)")

    @property
    def needs_data(self) -> bool:
        return self.blocks > 0 or (
            self.ratio is not None and (self.method is not StructuredMethod.L2 or bool(self.refit))
        )


@dataclass
class GroupRecord:
    name: str
    kind: str
    units_before: int
    units_after: int
    unit_size: int
    removed: list[int]  # original unit indices
    parameters_before: int
    parameters_after: int
    compensated: bool = False
    ratio: float = 0.0  # the fraction of units removed (chosen per group by the global allocation)
    refitted: int = 0  # consumer weights refitted by least squares


@dataclass
class BlockRecord:
    index: int
    influence: float
    removed: bool


@dataclass
class ShrinkReport:
    config: ShrinkConfig
    parameters_before: int
    parameters_after: int = 0
    groups: list[GroupRecord] = field(default_factory=list)
    blocks: list[BlockRecord] = field(default_factory=list)
    skipped: list[GroupSkip] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["config"]["method"] = self.config.method.value
        return data


Progress = Callable[[str], None]
# Runs the model on calibration data and returns the moments of the channel taps and the pairs' terms.
Measure = Callable[[ir.Model, list[ChannelTap], list[tuple[str, str]]], Moments]


def channel_taps(
    groups: list[Group], gram: bool = False, gram_stride: int = 1, pad_stride: int = 1
) -> list[ChannelTap]:
    """One tap per distinct consumer input of ``groups``: what wanda and flap need, and with ``gram`` the Gram
    matrix of the inputs of consumers the refit can solve (:func:`refittable`)."""
    taps: dict[str, ChannelTap] = {}
    for g in groups:
        for node, value, axis in g.consumer_inputs:
            weight = node.inputs[1].const_value  # type: ignore[union-attr]  # a consumer's weight: a stored constant
            assert weight is not None and value.name is not None
            rank = len(weight.shape) if node.op_type == "Conv" else None
            width = g.width * next(g.unit_size_of(i) for i, s in enumerate(g.slots) if s.node is node)
            tap = taps.setdefault(value.name, ChannelTap(value.name, axis, width, rank))
            if gram and not tap.gram and any(refittable(s) for s in g.consumers if s.node is node):
                taps[value.name] = replace(tap, gram=True, gram_stride=gram_stride, pad_stride=pad_stride)
    return sorted(taps.values(), key=lambda t: t.value)


def refittable(slot: Slot) -> bool:
    """Whether the refit solves this consumer: a MatMul/Gemm with a 2-D weight, or a pointwise (1x1, ungrouped)
    Conv. A kxk Conv mixes neighbouring positions, whose cross terms the channel Gram matrix lacks: it gets
    FLAP's bias fold instead."""
    shape = list(slot.value.const_value.shape)  # type: ignore[union-attr]  # slots hold stored constants
    node = slot.node
    if node.op_type in ("MatMul", "Gemm"):
        return len(shape) == 2
    if node.op_type == "Conv":
        group = node.attributes["group"].value if "group" in node.attributes else 1
        return group == 1 and all(d == 1 for d in shape[2:])
    return False


def calibrated(calibration: CalibrationRequest, on_batch: Callable[[int], None] | None = None) -> Measure:
    """The default :data:`Measure`: a tapped ONNX Runtime run over ``calibration``'s data."""

    def measure(model: ir.Model, channels: list[ChannelTap], pairs: list[tuple[str, str]]) -> Moments:
        return collect_moments(model, channels, pairs, calibration, on_batch)

    return measure


def shrink_model(
    model: ir.Model,
    config: ShrinkConfig,
    calibration: CalibrationRequest | None = None,
    on_stage: Progress | None = None,
    measure: Measure | None = None,
) -> ShrinkReport:
    """Remove blocks and units from ``model`` in place; the report says what went.

    Data comes from ``calibration``, or from ``measure`` (e.g. moments computed once for several shrinks).
    """
    config.validate()
    stage = on_stage or (lambda text: None)
    if measure is None and calibration is not None:
        measure = calibrated(calibration)
    if config.refit and measure is None:
        raise GraphpruneError("the refit needs calibration data: give calibration data or turn the refit off")
    config = config.resolved(measure is not None)
    if config.needs_data and measure is None:
        raise GraphpruneError(f"`method={config.method.value}` and `blocks` need calibration data: pass `calib`")
    if config.ratio is not None:  # exact rewrites first, so the parameter count sees lifted Constant weights
        prepare_graph(model, heads="heads" in config.units)
    report = ShrinkReport(config, parameter_count(model))
    if config.blocks:
        _remove_blocks(model, config.blocks, measure, report, stage)  # type: ignore[arg-type]  # not None: --blocks needs data (checked above)
    if config.ratio is not None:
        _shrink_groups(model, config, measure, report, stage, calibration)
    report.parameters_after = parameter_count(model)
    return report


def _remove_blocks(model: ir.Model, count: int, measure: Measure, report: ShrinkReport, stage: Progress) -> None:
    blocks = find_blocks(model)
    if not blocks:
        raise GraphpruneError("`blocks`: the model has no residual blocks (x + f(x) with weights in f)")
    if count >= len(blocks):
        raise GraphpruneError(
            f"`blocks={count}`: the model has {len(blocks)} residual blocks; at most {len(blocks) - 1} can go"
        )
    stage(f"measuring the influence of {len(blocks)} blocks")
    pairs = [(str(b.input.name), str(b.output.name)) for b in blocks]
    moments = measure(model, [], pairs)
    report.warnings += moments.warnings
    influence = np.array([moments.influence(p) for p in pairs])
    chosen = set(np.argsort(influence, kind="stable")[:count].tolist())
    bypass_blocks(model, [b for b in blocks if b.index in chosen])
    report.blocks = [BlockRecord(b.index, float(influence[b.index]), b.index in chosen) for b in blocks]


def _shrink_groups(
    model: ir.Model,
    config: ShrinkConfig,
    measure: Measure | None,
    report: ShrinkReport,
    stage: Progress,
    calibration: CalibrationRequest | None = None,
) -> None:
    assert config.ratio is not None
    scan = find_groups(model, config.units)
    report.skipped = scan.skips
    groups = scan.groups
    if not groups:
        reasons = "; ".join(sorted({s.reason for s in scan.skips})[:2])
        raise GraphpruneError(
            f"no structured unit ({','.join(config.units)}) found in the model"
            + (f": {len(scan.skips)} candidates skipped ({reasons})" if reasons else "")
        )
    for g in groups:
        if st.removal_count(g.width, config.ratio_for(g.name), _multiple(g, config)) >= g.width:
            raise GraphpruneError(
                f"group {g.name} ({g.kind}) has {g.width} units: a ratio of {config.ratio_for(g.name):g} would "
                "remove all of them"
            )
    records = [
        GroupRecord(g.name, g.kind, g.width, g.width, g.unit_size, [], g.parameters(), g.parameters())
        for g in groups
    ]
    rounds = _Rounds(model, config, measure, report, groups, records)
    if config.sequential:
        _one_by_one(rounds, stage, calibration)
    else:
        everything = list(range(len(groups)))
        for step in range(1, config.steps + 1):
            stage(f"round {step} of {config.steps}: calibrating")
            moments = rounds.measure(everything)
            stage(f"round {step} of {config.steps}: removing units")
            scores = rounds.scores(everything, moments)
            shares = rounds.allocation_scores(everything, moments, scores)
            counts = _round_counts(groups, records, shares, config, step / config.steps)
            rounds.remove(everything, counts, scores, moments)
    for record, g in zip(records, groups, strict=True):
        record.units_after = g.width
        record.removed.sort()
        record.parameters_after = g.parameters()
        record.ratio = round(len(record.removed) / record.units_before, 4)
    report.groups = records


class _Rounds:
    """Measure, score and remove for some of the groups at a time (all of them per round, or one by one)."""

    def __init__(
        self,
        model: ir.Model,
        config: ShrinkConfig,
        measure: Measure | None,
        report: ShrinkReport,
        groups: list[Group],
        records: list[GroupRecord],
    ) -> None:
        self.model, self.config, self.measure_fn, self.report = model, config, measure, report
        self.groups, self.records = groups, records
        self.alive = [np.arange(g.width) for g in groups]

    def measure(self, indices: list[int], gram: bool | None = None) -> Moments | None:
        """The moments of the given groups' consumer inputs on the model as it is now (None without data), with
        the Gram matrices where the refit or obs need them (or as ``gram`` says)."""
        config = self.config
        if config.method is StructuredMethod.L2 and not config.refit:
            return None
        assert self.measure_fn is not None
        if gram is None:
            gram = bool(config.refit) or config.method is StructuredMethod.OBS
        groups = [self.groups[i] for i in indices]
        taps = channel_taps(groups, gram=gram, gram_stride=config.gram_stride, pad_stride=config.pad_stride)
        moments = self.measure_fn(self.model, taps, [])
        self.report.warnings += [w for w in moments.warnings if w not in self.report.warnings]
        return moments

    def scores(self, indices: list[int], moments: Moments | None, most: int | None = None) -> list[np.ndarray]:
        """Each group's unit scores; obs's walk stops after ``most`` units (default: :meth:`most`)."""
        method, damp = self.config.method, self.config.damp
        return [
            _scores(self.groups[i], method, moments, damp, self.most(i) if most is None else most) for i in indices
        ]

    def allocation_scores(
        self, indices: list[int], moments: Moments | None, scores: list[np.ndarray]
    ) -> list[np.ndarray]:
        """The scores global allocation shares the budget by: ``scores`` unless ``allocate_by`` names another."""
        by = self.config.allocate_by
        if self.config.allocate == "uniform" or by is None or by is self.config.method:
            return scores
        return [_scores(self.groups[i], by, moments, self.config.damp, self.most(i)) for i in indices]

    def most(self, i: int) -> int:
        """The most units group ``i`` can lose now (where obs's greedy walk may stop): up to the cap under global
        allocation, else up to the group's own ratio."""
        g, record, config = self.groups[i], self.records[i], self.config
        pooled = config.allocate != "uniform" and config.pooled(g.name)
        ratio = config.ratio_max if pooled else config.ratio_for(g.name)
        return st.removal_count(record.units_before, ratio, _multiple(g, config)) - (record.units_before - g.width)

    def remove(
        self,
        indices: list[int],
        counts: list[int],
        scores: list[np.ndarray],
        moments: Moments | None,
        dense: DenseMoments | None = None,
    ) -> None:
        """Remove ``counts`` units of each group, the lowest-scoring, with the refit or FLAP's fold (the refit
        towards the dense model's outputs where ``dense`` has the consumer input's cross moments: then also of a
        group that loses no unit, whose input the shrunk prefix changed)."""
        removals = []
        for i, count, score in zip(indices, counts, scores, strict=True):
            if count <= 0 and not (dense and self.config.refit):
                continue
            g, record = self.groups[i], self.records[i]
            units = st.units_to_remove(score, max(count, 0))
            weights: dict[ir.Value, np.ndarray] = {}
            if self.config.refit:
                assert moments is not None  # measured whenever the refit is on
                bias, weights = _refit(g, units, moments, self.config.damp, dense or {}, self.config.target_blend)
            elif self.config.method is StructuredMethod.FLAP:
                assert moments is not None  # FLAP is measured
                bias = _flap_bias(g, units, moments)
            else:
                bias = {}
            removals.append(Removal(g, units, bias, weights))
            record.removed += self.alive[i][units].tolist()
            record.compensated |= bool(bias)
            record.refitted = max(record.refitted, len(weights))
            self.alive[i] = np.delete(self.alive[i], units)
        ShrinkPass(removals)(self.model)


def _one_by_one(rounds: _Rounds, stage: Progress, calibration: CalibrationRequest | None = None) -> None:
    """Each group in graph order, its units and its refit from its statistics on the already shrunk prefix.

    Global allocation needs every group's scores at once: it allocates once on the dense model's. With
    ``calibration`` the prefix is streamed block by block (:mod:`.shrink_stream`: about one inference in all);
    without it, or where the groups do not fall into blocks, every group is measured by a run of its own."""
    groups, records, config = rounds.groups, rounds.records, rounds.config
    counts = None
    if config.allocate != "uniform":
        stage("allocating: calibrating every group")
        everything = list(range(len(groups)))
        by = config.allocate_by or config.method  # the units themselves are chosen later, on the shrunk prefix
        moments = rounds.measure(everything, gram=by is StructuredMethod.OBS)
        shares = [_scores(groups[i], by, moments, config.damp, rounds.most(i)) for i in everything]
        counts = _round_counts(groups, records, shares, config, 1.0)
    order = _in_graph_order(rounds.model, groups)

    def shrink_group(i: int, moments: Moments | None, dense: DenseMoments | None = None) -> None:
        scores = rounds.scores([i], moments, counts[i] if counts is not None else None)  # walk no further
        own = _round_counts([groups[i]], [records[i]], scores, config, 1.0)[0]
        rounds.remove([i], [counts[i] if counts is not None else own], scores, moments, dense)

    measured = config.method is not StructuredMethod.L2 or config.refit
    whole = config.refit_scope == "all"
    targets = stream_targets(rounds.model, groups, whole) if calibration is not None and measured else None
    if targets is None and config.target == "dense":
        raise GraphpruneError(
            "`target=dense` needs calibration data and groups whose weights fall into the model's blocks"
        )
    if targets is not None:
        assert calibration is not None
        gram = bool(config.refit) or config.method is StructuredMethod.OBS
        warnings = shrink_streamed(
            rounds.model,
            groups,
            order,
            targets,
            calibration,
            gram,
            shrink_group,
            lambda done, total: stage(f"block {done} of {total} measured on the shrunk prefix and shrunk"),
            dense=config.target == "dense",
            refit_rest=(config.damp, config.target_blend) if whole else None,
            sampling=GramSampling(config.gram_stride, config.pad_stride, triangle=True),
        )
        rounds.report.warnings += [w for w in warnings if w not in rounds.report.warnings]
        return
    for n, i in enumerate(order, 1):
        stage(f"group {n} of {len(order)}: calibrating on the shrunk prefix")
        shrink_group(i, rounds.measure([i]))


def _in_graph_order(model: ir.Model, groups: list[Group]) -> list[int]:
    """Group indices in the order their first consumer runs (the graph is topologically sorted)."""
    position = {node: n for n, node in enumerate(model.graph)}
    return sorted(range(len(groups)), key=lambda i: min(position.get(s.node, 0) for s in groups[i].consumers))


def _round_counts(
    groups: list[Group],
    records: list[GroupRecord],
    scores: list[np.ndarray],
    config: ShrinkConfig,
    fraction: float,
) -> list[int]:
    """Units each group loses this round: ``fraction`` of the way to its ratio (uniform), or a share of each unit
    kind's budget in parameters (global; groups with a ratio of their own keep it)."""
    assert config.ratio is not None
    counts = []
    for g, record in zip(groups, records, strict=True):
        target = st.removal_count(record.units_before, config.ratio_for(g.name) * fraction, _multiple(g, config))
        counts.append(target - (record.units_before - g.width))
    if config.allocate == "uniform":
        return counts
    pooled = [i for i, g in enumerate(groups) if config.pooled(g.name)]
    for kind in sorted({groups[i].kind for i in pooled}):
        members = [i for i in pooled if groups[i].kind == kind]
        cost = [records[i].parameters_before / records[i].units_before for i in members]
        original = [records[i].units_before for i in members]
        budget = fraction * config.ratio * sum(c * o for c, o in zip(cost, original, strict=True))
        shares = allocate(
            [scores[i] for i in members],
            original,
            cost,
            budget,
            floor=config.ratio_min * fraction,
            cap=config.ratio_max,
            multiple=[_multiple(groups[i], config) for i in members],
            standardised=config.allocate == "global",
        )
        for i, share in zip(members, shares, strict=True):
            counts[i] = share
    return counts


def _multiple(group: Group, config: ShrinkConfig) -> int:
    """The units ``group`` keeps a multiple of: ``round_to`` is counted in channels, and a head already spans
    head_dim of them (its narrowest slot's; a GQA query slot holds a multiple of that)."""
    return st.unit_multiple(config.round_to, group.unit_size)


def _channel_first(array: np.ndarray, axis: int, consumer: bool) -> np.ndarray:
    moved = np.moveaxis(array, axis, 0)
    return moved.reshape(moved.shape[0], moved.shape[1], -1) if consumer else moved.reshape(moved.shape[0], -1)


def _consumer_terms(group: Group, moments: Moments) -> Iterator[tuple[int, np.ndarray, ChannelSums]]:
    """Per consumer slot: (slot index, channel-first weight, its input's Σx, Σx², rows)."""
    inputs = {node: value for node, value, _ in group.consumer_inputs}
    for i, slot in enumerate(group.slots):
        if slot.role != "consumer":
            continue
        weight = _channel_first(slot.value.const_value.numpy(), slot.axis, consumer=True)  # type: ignore[union-attr]  # slots hold stored constants
        name = str(inputs[slot.node].name)
        yield i, weight, (moments.sums[name], moments.sumsq[name], moments.rows[name])


def _scores(
    group: Group, method: StructuredMethod, moments: Moments | None, damp: float, steps: int | None = None
) -> np.ndarray:
    if method is StructuredMethod.L2:
        tensors = [
            _channel_first(s.value.const_value.numpy(), s.axis, consumer=s.role == "consumer")  # type: ignore[union-attr]  # slots hold stored constants
            for s in group.slots
            if s.role in ("producer", "consumer")
        ]
        return st.l2_scores([t.reshape(t.shape[0], -1) for t in tensors], group.width)
    assert moments is not None  # every method but l2 is measured
    terms = list(_consumer_terms(group, moments))
    weights = [w for _, w, _ in terms]
    if method is StructuredMethod.WANDA:
        return st.wanda_scores(weights, [m[1] for _, _, m in terms], group.width)
    variances = [st.channel_moments(*m)[1] for _, _, m in terms]
    if method is StructuredMethod.FLAP:
        return st.flap_scores(weights, variances, group.width)
    # obs: the greedy walk over the consumers the refit solves; FLAP's score (its diagonal case) for the others
    inputs = {node: str(value.name) for node, value, _ in group.consumer_inputs}
    walked, sizes = [], []
    total = np.zeros(group.width)
    for (i, weight, _), variance in zip(terms, variances, strict=True):
        slot, name = group.slots[i], inputs[group.slots[i].node]
        if refittable(slot) and name in moments.grams:
            gram, mean = moments_from_sums(*moments.gram_terms(name))
            walked.append((weight[:, :, 0].T * _output_scale(slot.node), gram, mean))
            sizes.append(group.unit_size_of(i))
        else:
            total += st.flap_scores([weight], [variance], group.width)
    if walked:
        total += greedy_costs(walked, sizes, damp, steps)
    return total


def _flap_bias(group: Group, units: np.ndarray, moments: Moments) -> dict[ir.Node, np.ndarray]:
    bias: dict[ir.Node, np.ndarray] = {}
    for i, weight, m in _consumer_terms(group, moments):
        mean, _ = st.channel_moments(*m)
        removed = st.channels_of_units(units, group.unit_size_of(i))
        bias[group.slots[i].node] = st.flap_bias(weight, mean, removed) * _output_scale(group.slots[i].node)
    return bias


def _refit(
    group: Group,
    units: np.ndarray,
    moments: Moments,
    damp: float,
    dense: DenseMoments | None = None,
    blend: float = 1.0,
) -> tuple[dict[ir.Node, np.ndarray], dict[ir.Value, np.ndarray]]:
    """Per consumer: the refitted weight (stored layout, full width) and its bias change; consumers the refit
    cannot solve (kxk Convs) get FLAP's bias fold, the refit restricted to the bias. ``dense``: per consumer
    input, Σ x_dense xᵀ and Σ x_dense over the Gram's rows, to fit the dense model's outputs (``blend`` of
    them)."""
    bias: dict[ir.Node, np.ndarray] = {}
    weights: dict[ir.Value, np.ndarray] = {}
    inputs = {node: value for node, value, _ in group.consumer_inputs}
    for i, weight, m in _consumer_terms(group, moments):
        slot = group.slots[i]
        name = inputs[slot.node].name
        removed = st.channels_of_units(units, group.unit_size_of(i))
        if not (refittable(slot) and name in moments.grams):
            bias[slot.node] = st.flap_bias(weight, st.channel_moments(*m)[0], removed) * _output_scale(slot.node)
            continue
        gram, mean = moments_from_sums(*moments.gram_terms(name))
        w = weight[:, :, 0].T.astype(np.float64)  # (out, K)
        kept = np.setdiff1d(np.arange(w.shape[1]), removed)
        target = None
        if dense and name in dense:
            cross, dense_mean = moments_from_sums(*dense[name], moments.gram_terms(name)[2])
            target = (blended_cross(cross, gram, blend), blend * dense_mean + (1.0 - blend) * mean)
        solved = refit(w, gram, mean, kept, damp, target)
        w[:, kept] = solved.weight
        stored = slot.value.const_value.numpy()  # type: ignore[union-attr]  # slots hold stored constants
        moved = np.moveaxis(stored, slot.axis, 0).shape
        weights[slot.value] = np.moveaxis(w.T.reshape(moved), 0, slot.axis).astype(stored.dtype)
        bias[slot.node] = solved.bias_delta * _output_scale(slot.node)
    return bias, weights


def _output_scale(node: ir.Node) -> float:
    """What multiplies the weight's product in the output: Gemm's ``alpha``, else 1."""
    if node.op_type == "Gemm" and "alpha" in node.attributes:
        return float(node.attributes["alpha"].value)
    return 1.0


def shrink_file(
    model_path: str | Path,
    config: ShrinkConfig,
    output: str | Path | None = None,
    force: bool = False,
    calibration: CalibrationRequest | None = None,
    on_stage: Progress | None = None,
) -> tuple[Path, ShrinkReport]:
    """Shrink ``model_path`` into ``output`` (default ``<stem>.shrunk.onnx``) and write the report beside it."""
    from graphprune.artifacts import OutputPlan
    from graphprune.graph.model_io import load_model, uses_external_data
    from graphprune.pipeline.files import report_path

    config.validate()
    model_path = Path(model_path)
    out = Path(output) if output is not None else model_path.with_name(f"{model_path.stem}.shrunk.onnx")
    outputs = OutputPlan(calibration.files() if calibration else (), force)
    outputs.read(model_path, "the input model")
    out, report_file = outputs.model(out), outputs.file(report_path(out), "report")
    outputs.check()  # before any work
    model = load_model(model_path)
    external = uses_external_data(model)
    report = shrink_model(model, config, calibration, on_stage)
    with outputs.transaction() as files:
        files.model(out, model, external_data=True if external else None)  # keep the input's layout
        files.json(report_file, report.to_dict())
    return out, report
