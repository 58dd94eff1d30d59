"""Sequential shrinking in one streamed pass: each block's groups measured on the already shrunk prefix.

``shrink(sequential=True)`` removes the units of one group at a time in graph order, each group measured on the
model whose earlier groups are already gone. Measuring every group with a fresh tapped run from the graph inputs
costs a prefix of the model per group (about half a model per group on average: ~15 full passes for a 30-layer
decoder). The sequential engine of ``apply --sequential`` (:class:`~graphprune.pipeline.sequential.
SequentialCalibration`) runs the graph segment by segment instead, keeping the tensors that cross from one
segment to the next, so the whole pass costs about one inference plus what the nodes downstream of each shrunk
block cost to run again.

The engine groups *weights* into blocks (the graph's repeating unit of weight levels). Here the weights are the
groups' producers and consumers: a group is shrunk in the callback of the block that holds all of them, so the
tensors between its producers and consumers, whose width the shrink changes, are recomputed by the next segment
from the block's (unchanged) inputs, never read back at their old width. A group whose weights span two blocks
(or that owns a weight the engine cannot calibrate) makes the whole model fall back to the per-group runs.
Groups of one block (an attention's heads and the MLP after it) are measured together, before either shrinks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import onnx_ir as ir

from graphprune.calibration.moments import Moments
from graphprune.calibration.providers import resolve_providers
from graphprune.calibration.request import CalibrationRequest
from graphprune.calibration.stats import ActivationStats
from graphprune.graph.groups import Group
from graphprune.graph.targets import Target, find_targets
from graphprune.pipeline.sequential import SequentialCalibration, target_groups

# Shrinks group i (an index into the groups given) from the moments of its consumer inputs.
ShrinkGroup = Callable[[int, Moments], None]


def _weights(group: Group) -> set[str]:
    return {str(s.value.name) for s in group.slots if s.role in ("producer", "consumer")}


def stream_targets(model: ir.Model, groups: Sequence[Group]) -> list[Target] | None:
    """The groups' producer and consumer weights as the engine's targets, or None when some group's weights are
    not all targets of one block (the streamed pass could then read a tensor at its width before the shrink)."""
    found = {t.name: t for t in find_targets(model, include_head=True).targets}
    names = [_weights(g) for g in groups]
    if not all(n <= found.keys() for n in names):
        return None
    targets = [found[name] for name in sorted(set().union(*names))]
    block_of = {t.name: b for b, block in enumerate(target_groups(model, targets, "block")) for t in block}
    if any(len({block_of[name] for name in n}) != 1 for n in names):
        return None
    return targets


def moments_of(stats: ActivationStats, group: Group) -> Moments:
    """The moments :mod:`graphprune.pipeline.shrink` reads (by consumer input), from the engine's statistics
    (by consumer weight)."""
    out = Moments(warnings=list(stats.warnings))
    consumers = {id(s.node): str(s.value.name) for s in group.consumers}
    for node, value, _ in group.consumer_inputs:
        weight, name = consumers[id(node)], str(value.name)
        out.sums[name], out.sumsq[name], out.rows[name] = (
            stats.sums[weight],
            stats.sumsq[weight],
            stats.rows[weight],
        )
        if weight in stats.gram:
            out.grams[name] = stats.gram[weight]
    return out


def shrink_streamed(
    model: ir.Model,
    groups: Sequence[Group],
    order: Sequence[int],
    targets: Sequence[Target],
    calibration: CalibrationRequest,
    gram: bool,
    shrink_group: ShrinkGroup,
    on_block: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Run ``model`` block by block over ``calibration``'s data, calling ``shrink_group`` for every group (in
    ``order``) as soon as its block is measured; returns the calibration warnings."""
    batches, warnings = calibration.batches(model)
    engine = SequentialCalibration(
        model, batches, resolve_providers(calibration.provider), gram, "block", on_block, sums=True
    )
    pending = list(order)

    def shrink_block(block: list[Target], stats: ActivationStats) -> None:
        measured = {t.name for t in block}
        for i in [i for i in pending if {str(s.value.name) for s in groups[i].consumers} <= measured]:
            shrink_group(i, moments_of(stats, groups[i]))
            pending.remove(i)

    engine.run(targets, shrink_block)
    return [*warnings, *engine.warnings]
