"""Solved codes for the weights to quantize: GPTQ (:func:`graphprune.algorithms.gptq.gptq_quantize` under the
weight's own zeros as the mask, so a pruned weight stays exactly zero), or round to nearest on searched scales
(:mod:`graphprune.algorithms.clip_search`). The Gram matrices come from calibration (or a saved statistics file),
rescaled where smoothing divided the activation.

Smoothing is exact, so the activations of the smoothed model are x / s of the original's: the Gram matrix of
x / s is ``D⁻¹ G D⁻¹`` (``D = diag(s)``), computed from the original model's G without another run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphprune.algorithms.clip_search import searched_scales
from graphprune.algorithms.gptq import gptq_quantize
from graphprune.algorithms.layout import to_canonical
from graphprune.algorithms.quant_grid import QuantGrid, quantize_codes
from graphprune.algorithms.scale_refit import refit_scales
from graphprune.calibration.request import CalibrationRequest
from graphprune.calibration.stats import ActivationStats
from graphprune.graph.stored import read_array, stored_tensor
from graphprune.graph.targets import Target
from graphprune.quantize.config import QuantizeConfig
from graphprune.quantize.passes import QuantizePass


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


def solve_weight(
    w: np.ndarray, gram: np.ndarray | None, grid: QuantGrid, config: QuantizeConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Codes and scales of one canonical ``(out, K)`` float32 weight: GPTQ under its zeros, or round to nearest
    on the (clipped) scales, then with ``refit_scales`` the scales re-solved for those codes; ``gram`` is needed
    by GPTQ, the ``hessian`` clip and the refit."""
    codes, scales = _rounded(w, gram, grid, config)
    if config.refit_scales:
        assert gram is not None
        scales = refit_scales(w, codes, scales, gram, grid)
    return codes, scales


def _rounded(
    w: np.ndarray, gram: np.ndarray | None, grid: QuantGrid, config: QuantizeConfig
) -> tuple[np.ndarray, np.ndarray]:
    if config.method == "gptq":
        assert gram is not None
        return gptq_quantize(
            w,
            gram,
            grid,
            keep=w != 0,
            percdamp=config.percdamp,
            act_order=config.act_order,
            clip=config.weight_clip,
        )
    scales = searched_scales(w, grid, config.weight_clip, gram)
    return quantize_codes(w, scales, grid), scales


def canonical_weight(model: ir.Model, t: Target) -> np.ndarray:
    """A 2-D target's stored weight as float32 ``(out, K)``."""
    stored = read_array(stored_tensor(model.graph.initializers[t.name]))
    return to_canonical(stored, t.k_axis, t.out_axis)[:, 0, :].astype(np.float32)


def solved_codes(
    model: ir.Model,
    targets: Sequence[Target],
    config: QuantizeConfig,
    stats: ActivationStats | None,
    smoothing: Mapping[str, np.ndarray],
    on_weight: Callable[[str], None] | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``name -> (codes, scales)`` in the canonical ``(out, K)`` layout, for the 2-D weights (a Conv's kernel
    positions would need a Gram per position: its weights are rounded to nearest by the quantization pass)."""
    grid = QuantizePass.grid_of(config)
    solved = {}
    for t in targets:
        if len(t.shape) != 2:
            continue
        gram = stats.gram[t.name] if stats is not None else None
        s = smoothing.get(t.consumers[0].activation)
        if s is not None and gram is not None:
            gram = gram / np.outer(s, s)
        solved[t.name] = solve_weight(canonical_weight(model, t), gram, grid, config)
        if on_weight:
            on_weight(t.name)
    return solved
