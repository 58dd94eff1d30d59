"""GPTQ codes for the weights to quantize: the Gram matrices from calibration (or a saved statistics file),
rescaled where smoothing divided the activation, and :func:`graphprune.algorithms.gptq.gptq_quantize` under the
weight's own zeros as the mask (a pruned weight stays exactly zero and takes no update).

Smoothing is exact, so the activations of the smoothed model are x / s of the original's: the Gram matrix of
x / s is ``D⁻¹ G D⁻¹`` (``D = diag(s)``), computed from the original model's G without another run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphprune.algorithms.gptq import gptq_quantize
from graphprune.algorithms.layout import to_canonical
from graphprune.algorithms.quant_grid import QuantGrid
from graphprune.calibration.request import CalibrationRequest
from graphprune.calibration.stats import ActivationStats
from graphprune.graph.stored import read_array, stored_tensor
from graphprune.graph.targets import Target


def gram_statistics(
    model_path: Path, targets: Sequence[Target], stats: ActivationStats | None, calibration: CalibrationRequest
) -> ActivationStats:
    """Grams of every target: the saved ones (checked against this model) or a calibration run with Grams."""
    if stats is None:
        from dataclasses import replace

        from graphprune.calibration import calibrate

        stats = calibrate(model_path, replace(calibration, gram=True), targets)
    stats.check(list(targets), gram=True)
    return stats


def gptq_codes(
    model: ir.Model,
    targets: Sequence[Target],
    grid: QuantGrid,
    stats: ActivationStats,
    smoothing: Mapping[str, np.ndarray],
    on_weight: Callable[[str], None] | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``name -> (codes, scales)`` in the canonical ``(out, K)`` layout, for the 2-D weights (a Conv's kernel
    positions would need a Gram per position: its weights are rounded to nearest)."""
    solved = {}
    for t in targets:
        if len(t.shape) != 2:
            continue
        w = to_canonical(read_array(stored_tensor(model.graph.initializers[t.name])), t.k_axis, t.out_axis)[
            :, 0, :
        ]
        gram = stats.gram[t.name]
        s = smoothing.get(t.consumers[0].activation)
        if s is not None:
            gram = gram / np.outer(s, s)
        solved[t.name] = gptq_quantize(w.astype(np.float32), gram, grid, keep=w != 0)
        if on_weight:
            on_weight(t.name)
    return solved
