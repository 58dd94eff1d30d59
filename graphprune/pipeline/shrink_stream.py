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

Dense targets (``dense``): a :class:`~graphprune.pipeline.dense_targets.DenseStream` runs the dense model's
segments beside the shrunk ones and measures, per consumer input, the cross moments Σ x_dense xᵀ and Σ x_dense,
from which the refit fits the dense model's outputs (the ``target`` of :func:`graphprune.algorithms.refit.refit`).
The dense segments must compute what the dense model computes: they swap every tensor the shrink changes back to
its dense value, the groups' weights, biases and norms, and the consumers' biases, which the refit changes (a zero
bias is added first where a consumer has none, so that the dense segments see it as zero). Groups that rewrite
shapes (heads) or depthwise convolutions are not offered.

Whole-block reconstruction (``refit_rest``): the other linear layers of the blocks are refitted towards the dense
outputs too, level by level (:mod:`graphprune.pipeline.block_refit`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from graphprune.calibration.gram_taps import ALL_ROWS, GramSampling
from graphprune.calibration.moments import Moments
from graphprune.calibration.providers import resolve_providers
from graphprune.calibration.request import CalibrationRequest
from graphprune.calibration.stats import ActivationStats
from graphprune.errors import GraphpruneError
from graphprune.graph.groups import Group, slot_names
from graphprune.graph.targets import Target, find_targets
from graphprune.passes.shrink import add_bias, stored_bias
from graphprune.pipeline.block_refit import level_groups, lossless_targets, refit_lossless
from graphprune.pipeline.boundary import BoundaryTensors
from graphprune.pipeline.dense_targets import DenseStream
from graphprune.pipeline.sequential import SequentialCalibration, target_groups

DenseMoments = dict[str, tuple[np.ndarray, np.ndarray]]  # per consumer input: Σ x_dense xᵀ, Σ x_dense
# Shrinks group i (an index into the groups given) from the moments of its consumer inputs (and dense ones).
ShrinkGroup = Callable[[int, Moments, DenseMoments | None], None]


def _weights(group: Group) -> set[str]:
    return slot_names([*group.producers, *group.consumers])


def stream_targets(model: ir.Model, groups: Sequence[Group], by_level: bool = False) -> list[Target] | None:
    """The groups' producer and consumer weights as the engine's targets, or None when some group's weights are
    not all targets of one block (the streamed pass could then read a tensor at its width before the shrink).
    ``by_level``: streamed by level (:func:`~graphprune.pipeline.block_refit.level_groups` checks the levels)."""
    found = {t.name: t for t in find_targets(model, include_head=True).targets}
    names = [_weights(g) for g in groups]
    if not all(n <= found.keys() for n in names):
        return None
    targets = [found[name] for name in sorted(set().union(*names))]
    if by_level:
        return targets
    block_of = {t.name: b for b, block in enumerate(target_groups(model, targets, "block")) for t in block}
    if any(len({block_of[name] for name in n}) != 1 for n in names):
        return None
    return targets


def moments_of(stats: ActivationStats, group: Group) -> Moments:
    """The moments :mod:`graphprune.pipeline.shrink` reads (by consumer input), from the engine's statistics
    (by consumer weight)."""
    out = Moments(warnings=list(stats.warnings))
    for name, weight in _consumer_weights(group):
        out.sums[name], out.sumsq[name], out.rows[name] = (
            stats.sums[weight],
            stats.sumsq[weight],
            stats.rows[weight],
        )
        if weight in stats.gram:
            out.grams[name] = stats.gram[weight]
        if weight in stats.gram_sums:  # the Gram matrix's own rows (strided or padded ones sampled)
            out.gram_sums[name], out.gram_rows[name] = stats.gram_sums[weight], stats.gram_rows[weight]
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
    dense: bool = False,
    refit_rest: tuple[float, float] | None = None,
    sampling: GramSampling = ALL_ROWS,
) -> list[str]:
    """Run ``model`` block by block over ``calibration``'s data, calling ``shrink_group`` for every group (in
    ``order``) as soon as its block is measured; returns the calibration warnings. With ``dense`` the dense
    model's stream runs beside, for the refit towards its outputs. ``refit_rest`` (damping, blend; with
    ``dense``): also refit every linear layer that loses nothing, level by level. ``sampling``: the Gram
    matrices' rows."""
    rest = lossless_targets(model, groups) if refit_rest is not None else []
    names = {t.name for t in targets}
    targets = [*targets, *(t for t in rest if t.name not in names)]
    batches, warnings = calibration.batches(model)
    providers = resolve_providers(calibration.provider)
    engine = SequentialCalibration(
        model, batches, providers, gram, "block", on_block, sums=True, sampling=sampling
    )
    if dense:
        also = _kept_dense(model, groups, {t.name for t in targets})
        engine.dense = DenseStream(model, targets, providers, BoundaryTensors(), also)
    pending = list(order)

    def shrink_block(block: list[Target], stats: ActivationStats) -> None:
        measured = {t.name for t in block}
        for i in [i for i in pending if slot_names(groups[i].consumers) <= measured]:
            shrink_group(i, moments_of(stats, groups[i]), _dense_moments(stats, groups[i]) if dense else None)
            pending.remove(i)
        if refit_rest is not None:  # each once, on the level that first measures it
            todo = [t for t in block if t.name in unfitted]
            unfitted.difference_update(refit_lossless(model, todo, stats, *refit_rest))

    unfitted = {t.name for t in rest}
    engine.run(targets, shrink_block, level_groups(model, targets, groups) if refit_rest is not None else None)
    return [*warnings, *engine.warnings]


def _kept_dense(model: ir.Model, groups: Sequence[Group], targets: set[str]) -> list[str]:
    """The stored tensors besides ``targets`` that the dense segments swap back: every tensor of the groups and
    each consumer's bias (a zero one added where a consumer has none)."""
    producers = {id(s.node) for g in groups for s in g.slots if s.role == "producer"}
    for g in groups:
        if g.shape_edits or g.depthwise:
            raise GraphpruneError(f"`target=dense`: group {g.name} rewrites shapes or depthwise convolutions")
        for slot in g.consumers:
            if id(slot.node) in producers:  # its new bias would join the next group: not offered
                raise GraphpruneError(f"`target=dense`: consumer {slot.node.name} also produces another group")
            if stored_bias(slot.node) is None:
                weight = np.moveaxis(slot.value.const_value.numpy(), slot.axis, 0)  # type: ignore[union-attr]  # slots hold stored constants
                add_bias(model.graph, slot.node, np.zeros(weight.shape[1], weight.dtype))
    names = {str(s.value.name) for g in groups for s in g.slots}
    names |= {str(b.name) for g in groups for s in g.consumers if (b := stored_bias(s.node)) is not None}
    return sorted(names - targets)


def _dense_moments(stats: ActivationStats, group: Group) -> DenseMoments:
    """Per consumer input: Σ x_dense xᵀ and Σ x_dense, where the dense stream measured them."""
    out: DenseMoments = {}
    for name, weight in _consumer_weights(group):
        if weight in stats.cross and weight in stats.dense_sums:
            out[name] = (stats.cross[weight], stats.dense_sums[weight])
    return out


def _consumer_weights(group: Group) -> list[tuple[str, str]]:
    """(consumer input, consumer weight) names: the engine measures by weight, the shrink reads by input."""
    weights = {id(s.node): str(s.value.name) for s in group.consumers}
    return [(str(value.name), weights[id(node)]) for node, value, _ in group.consumer_inputs]
