"""Activation-aware weight scaling before weight-only int4 rounding, folded exactly into the model.

For each activation read only by weights to quantize (Q/K/V, gate/up, down), the scales come from the search of
:func:`graphprune.algorithms.awq.search_scales` on the activation's Gram matrix (the one GPTQ reads) and are folded
where SmoothQuant's are (:func:`graphprune.quantize.smooth.fold_groups`: a norm's weight, the producing weights'
output columns): the activation becomes ``x / s`` and each consumer's K rows are multiplied by ``s``, so the float
model computes the same function and a pruned weight stays zero. The Gram matrix of ``x / s`` is
``diag(s)⁻¹ H diag(s)⁻¹``, which :func:`graphprune.quantize.gptq_weights.solved_codes` computes from the saved one.

The search rounds to nearest on absmax scales, as the reference's scale search does (its clip search comes after,
here ``weight_clip``, run by the solver on the scaled weights): a Gram-weighted clip search inside every alpha was
~15x the cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphprune.algorithms.awq import search_scales
from graphprune.algorithms.layout import to_canonical
from graphprune.calibration.stats import ActivationStats
from graphprune.graph.stored import read_array, stored_tensor
from graphprune.graph.targets import Target
from graphprune.quantize.config import QuantizeConfig
from graphprune.quantize.passes import QuantizePass
from graphprune.quantize.smooth import SmoothRecord, fold_groups


@dataclass(frozen=True)
class AwqRecord:
    """One searched activation: the chosen alpha and the group's output error with and without its scales."""

    activation: str
    alpha: float
    error: float
    unscaled_error: float


def awq(
    model: ir.Model, targets: Sequence[Target], stats: ActivationStats, config: QuantizeConfig
) -> tuple[list[SmoothRecord], list[AwqRecord], dict[str, np.ndarray]]:
    """Search and fold the scales of every activation that can take them; ``stats`` holds the Gram matrices of
    the model as it is now. Returns the fold records, the search records and the scales per activation."""
    grid = QuantizePass.grid_of(config)
    searched: list[AwqRecord] = []

    def scales(activation: str, group: Sequence[Target], weights: Sequence[ir.Value]) -> np.ndarray:
        canonical = [
            to_canonical(read_array(stored_tensor(w)), t.k_axis, t.out_axis).reshape(-1, t.k)
            for w, t in zip(weights, group, strict=True)
        ]
        result = search_scales(canonical, stats.gram[group[0].name], grid)
        searched.append(AwqRecord(activation, result.alpha, result.error, result.unscaled_error))
        return result.scales

    records, folded = fold_groups(model, targets, scales)
    return records, searched, folded
