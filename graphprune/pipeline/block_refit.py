"""Whole-block reconstruction in the streamed sequential shrink: refit the linear layers that lose nothing too.

With dense targets the shrink refits every consumer of removed channels towards the dense model's outputs. The
other linear layers of a block (a decoder's Q/K/V, O, gate/up) lose nothing, but their inputs come from the
already shrunk prefix, so their outputs drift from the dense model's as well. "Free Lunch" reconstructs whole
sub-blocks against the dense model; here each of these layers gets the consumers' closed form with nothing
removed (``kept``: every input channel),

    min over Ŵ of  a‖W X_d - Ŵ X_p‖² + (1 - a)‖(W - Ŵ) X_p‖² + λ‖Ŵ - W‖²,

from the shrunk prefix's Gram matrix ``G``, the cross moments ``C = E[x_d x_pᵀ]`` and the same blend ``a`` and
damping λ (:func:`graphprune.algorithms.refit.refit`): ``Ŵ = W + a W (C - G)(G + λI)⁻¹``. With nothing shrunk
upstream ``C = G`` and the weight stays as it is. Biases are left alone (most decoders' projections have none, and
a new one would change the graph): the fit has no constant term.

Order. Each layer must be fitted on inputs that the layers before it, already refitted, produce. The stream runs
by *level* (Q/K/V, then O, then gate/up, ...) instead of by block; a level holding a group's consumers also takes
that group's producers, measured again on their refitted weights, so each group is still shrunk from one
measurement of all its weights, and no tensor between its producers and consumers is kept at its old width.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from graphprune.algorithms.dense_target import blended_cross
from graphprune.algorithms.refit import moments_from_sums, refit
from graphprune.calibration.stats import ActivationStats
from graphprune.errors import GraphpruneError
from graphprune.graph.groups import Group, slot_names
from graphprune.graph.stored import read_array, replace_tensor, stored_tensor, stored_values
from graphprune.graph.targets import Target, find_targets
from graphprune.pipeline.sequential import target_levels

REFIT_SCOPES = ("consumers", "all")  # which layers the sequential refit solves: the consumers of removed channels
# only, or every linear layer of the shrunk blocks (whole-block reconstruction, with dense targets)


def lossless_targets(model: ir.Model, groups: Sequence[Group]) -> list[Target]:
    """The 2-D MatMul/Gemm weights (not the head) that no group's consumer is and whose stored tensor is the
    weight itself, as floats: the layers whole-block reconstruction refits besides the consumers."""
    consumers = set().union(*(slot_names(g.consumers) for g in groups))
    return [
        t
        for t in find_targets(model, include_head=False).targets
        if t.name not in consumers
        and not t.through
        and len(t.shape) == 2
        and t.dtype in ("float32", "float16")
        and all(c.op in ("MatMul", "Gemm") and not c.in_subgraph for c in t.consumers)
    ]


def level_groups(model: ir.Model, targets: Sequence[Target], groups: Sequence[Group]) -> list[list[Target]]:
    """The engine's groups: ``targets`` by level, a level that holds a group's consumers joined by the group's
    producers. Refused (one line) where a group's consumers span levels or its producers are not on the level
    just before them (a level between could keep a producer's output at its width before the shrink)."""
    levels = target_levels(model, targets)
    level_of = {t.name: n for n, level in enumerate(levels) for t in level}
    by_name = {t.name: t for t in targets}
    joined = [list(level) for level in levels]
    for g in groups:
        at = {level_of.get(name, -1) for name in slot_names(g.consumers)}
        n = at.pop()
        producers = sorted(slot_names(g.producers))
        if at or n < 0 or any(level_of.get(p) not in (n - 1, n) for p in producers):
            raise GraphpruneError(f"`refit_scope=all`: group {g.name}'s weights are not on consecutive levels")
        joined[n] += [by_name[p] for p in producers if by_name[p] not in joined[n]]
    return joined


def refit_lossless(
    model: ir.Model, targets: Sequence[Target], stats: ActivationStats, damp: float, blend: float
) -> list[str]:
    """Refit each of ``targets`` measured in ``stats`` (its Gram matrix and dense cross moments) towards the
    blended dense output, in place; returns the names refitted."""
    stored = stored_values(model.graph)
    done = []
    for t in targets:
        name = t.name
        if name not in stats.gram or name not in stats.cross:
            continue
        rows = stats.gram_rows.get(name, stats.rows[name])  # the Gram matrix's own rows where they are sampled
        gram = np.asarray(stats.gram[name], np.float64) / rows
        cross, _ = moments_from_sums(stats.cross[name], np.zeros(gram.shape[0]), rows)
        value = stored[name]
        array = read_array(stored_tensor(value))
        w = np.moveaxis(array, (t.out_axis, t.k_axis), (0, 1)).astype(np.float64)  # (out, K)
        everything = np.arange(w.shape[1])
        solved = refit(w, gram, None, everything, damp, (blended_cross(cross, gram, blend), None))
        new = np.moveaxis(solved.weight, (0, 1), (t.out_axis, t.k_axis)).astype(array.dtype)
        replace_tensor(value, ir.Tensor(np.ascontiguousarray(new), name=name))
        done.append(name)
    return done
