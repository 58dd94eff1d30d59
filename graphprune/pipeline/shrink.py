"""Structured pruning end to end: remove blocks, then shrink groups in one or more calibrated rounds.

:func:`shrink_model` works on an ``onnx_ir.Model`` in place; :func:`shrink_file` reads a file, shrinks it and
writes the smaller model and its JSON report (nothing is written when anything fails; the input is never touched).
Order: blocks first (ShortGPT measures every block's influence on the dense model once, then the lowest go), then
``steps`` rounds that each remove an equal share of every group's units, re-calibrating the shrunk model before
each round when the method uses data.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphprune.algorithms import structured as st
from graphprune.algorithms.structured import StructuredMethod
from graphprune.calibration.moments import ChannelTap, Moments, collect_moments
from graphprune.calibration.request import CalibrationRequest
from graphprune.errors import GraphpruneError
from graphprune.graph.blocks import bypass_blocks, find_blocks
from graphprune.graph.groups import Group, GroupSkip, find_groups
from graphprune.graph.prepare import prepare_graph
from graphprune.passes.shrink import Removal, ShrinkPass, parameter_count

UNIT_KINDS = ("mlp", "heads", "channels")


@dataclass(frozen=True)
class ShrinkConfig:
    """What to remove: ``ratio`` of every group's units (of the ``units`` kinds) and ``blocks`` whole blocks."""

    ratio: float | None = None
    units: tuple[str, ...] = UNIT_KINDS
    method: StructuredMethod = StructuredMethod.L2
    blocks: int = 0
    steps: int = 1
    round_to: int = 1  # leave a multiple of this many units in every group
    # per-layer ratios: (shell pattern on the group name, ratio in [0, 1)); the first match wins over ``ratio``
    overrides: tuple[tuple[str, float], ...] = ()

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

    @property
    def needs_data(self) -> bool:
        return self.blocks > 0 or (self.ratio is not None and self.method is not StructuredMethod.L2)


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


def channel_taps(groups: list[Group]) -> list[ChannelTap]:
    """One tap per distinct consumer input of ``groups``: what wanda and flap need."""
    taps: dict[str, ChannelTap] = {}
    for g in groups:
        for node, value, axis in g.consumer_inputs:
            weight = node.inputs[1].const_value  # type: ignore[union-attr]
            assert weight is not None and value.name is not None
            rank = len(weight.shape) if node.op_type == "Conv" else None
            width = g.width * next(g.unit_size_of(i) for i, s in enumerate(g.slots) if s.node is node)
            taps.setdefault(value.name, ChannelTap(value.name, axis, width, rank))
    return sorted(taps.values(), key=lambda t: t.value)


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
    if config.needs_data and measure is None:
        raise GraphpruneError(f"`method={config.method.value}` and `blocks` need calibration data: pass `calib`")
    if config.ratio is not None:  # exact rewrites first, so the parameter count sees lifted Constant weights
        prepare_graph(model, heads="heads" in config.units)
    report = ShrinkReport(config, parameter_count(model))
    if config.blocks:
        _remove_blocks(model, config.blocks, measure, report, stage)  # type: ignore[arg-type]
    if config.ratio is not None:
        _shrink_groups(model, config, measure, report, stage)
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
    pairs = [(b.input.name, b.output.name) for b in blocks]
    moments = measure(model, [], pairs)
    report.warnings += moments.warnings
    influence = np.array([moments.influence(p) for p in pairs])  # type: ignore[arg-type]
    chosen = set(np.argsort(influence, kind="stable")[:count].tolist())
    bypass_blocks(model, [b for b in blocks if b.index in chosen])
    report.blocks = [BlockRecord(b.index, float(influence[b.index]), b.index in chosen) for b in blocks]


def _shrink_groups(
    model: ir.Model,
    config: ShrinkConfig,
    measure: Measure | None,
    report: ShrinkReport,
    stage: Progress,
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
        if st.removal_count(g.width, config.ratio_for(g.name), config.round_to) >= g.width:
            raise GraphpruneError(
                f"group {g.name} ({g.kind}) has {g.width} units: a ratio of {config.ratio_for(g.name):g} would "
                "remove all of them"
            )
    records = [
        GroupRecord(g.name, g.kind, g.width, g.width, g.unit_size, [], g.parameters(), g.parameters())
        for g in groups
    ]
    alive = [np.arange(g.width) for g in groups]
    for step in range(1, config.steps + 1):
        fraction = step / config.steps
        moments = None
        if config.method is not StructuredMethod.L2:
            assert measure is not None
            stage(f"round {step} of {config.steps}: calibrating")
            moments = measure(model, channel_taps(groups), [])
            report.warnings += [w for w in moments.warnings if w not in report.warnings]
        stage(f"round {step} of {config.steps}: removing units")
        removals = []
        for i, g in enumerate(groups):
            original = records[i].units_before
            target = st.removal_count(original, config.ratio_for(g.name) * fraction, config.round_to)
            count = target - (original - g.width)
            if count <= 0:
                continue
            units = st.units_to_remove(_scores(g, config.method, moments), count)
            bias = _flap_bias(g, units, moments) if config.method is StructuredMethod.FLAP else {}
            removals.append(Removal(g, units, bias))
            records[i].removed += alive[i][units].tolist()
            records[i].compensated |= bool(bias)
            alive[i] = np.delete(alive[i], units)
        ShrinkPass(removals)(model)
    for record, g in zip(records, groups, strict=True):
        record.units_after = g.width
        record.removed.sort()
        record.parameters_after = g.parameters()
    report.groups = records


def _channel_first(array: np.ndarray, axis: int, consumer: bool) -> np.ndarray:
    moved = np.moveaxis(array, axis, 0)
    return moved.reshape(moved.shape[0], moved.shape[1], -1) if consumer else moved.reshape(moved.shape[0], -1)


def _consumer_terms(group: Group, moments):  # type: ignore[no-untyped-def]
    """Per consumer slot: (slot index, channel-first weight, its input's Σx, Σx², rows)."""
    inputs = {node: value for node, value, _ in group.consumer_inputs}
    for i, slot in enumerate(group.slots):
        if slot.role != "consumer":
            continue
        weight = _channel_first(slot.value.const_value.numpy(), slot.axis, consumer=True)  # type: ignore[union-attr]
        if moments is None:
            yield i, weight, None
            continue
        name = inputs[slot.node].name
        yield i, weight, (moments.sums[name], moments.sumsq[name], moments.rows[name])


def _scores(group: Group, method: StructuredMethod, moments) -> np.ndarray:  # type: ignore[no-untyped-def]
    if method is StructuredMethod.L2:
        tensors = [
            _channel_first(s.value.const_value.numpy(), s.axis, consumer=s.role == "consumer")  # type: ignore[union-attr]
            for s in group.slots
            if s.role in ("producer", "consumer")
        ]
        return st.l2_scores([t.reshape(t.shape[0], -1) for t in tensors], group.width)
    terms = list(_consumer_terms(group, moments))
    weights = [w for _, w, _ in terms]
    if method is StructuredMethod.WANDA:
        return st.wanda_scores(weights, [m[1] for _, _, m in terms], group.width)
    variances = [st.channel_moments(*m)[1] for _, _, m in terms]
    return st.flap_scores(weights, variances, group.width)


def _flap_bias(group: Group, units: np.ndarray, moments) -> dict[ir.Node, np.ndarray]:  # type: ignore[no-untyped-def]
    bias: dict[ir.Node, np.ndarray] = {}
    for i, weight, m in _consumer_terms(group, moments):
        mean, _ = st.channel_moments(*m)
        removed = st.channels_of_units(units, group.unit_size_of(i))
        bias[group.slots[i].node] = st.flap_bias(weight, mean, removed)
    return bias


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
