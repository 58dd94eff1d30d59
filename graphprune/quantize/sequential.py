"""GPTQ block by block: each block's Gram matrices measured on the model whose earlier blocks are already
quantized, as the GPTQ reference calibrates (``quantize(..., sequential=True)``).

The engine is the pruning pipeline's (:class:`graphprune.pipeline.sequential.SequentialCalibration`): it runs
the graph segment by segment and hands each group of targets its statistics. Here a group's weights are solved
(:func:`~graphprune.quantize.gptq_weights.solve_weight`) and written back into the model as their dequantized
values ``code · scale``, exactly what DequantizeLinear → MatMul computes in float32, so the segments after it see
the quantized block. At the end the float weights are put back: the quantization pass writes the solved codes
and measures each weight's error against its original values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from graphprune.algorithms.layout import from_canonical
from graphprune.algorithms.quant_grid import dequantize_codes
from graphprune.calibration.stats import ActivationStats
from graphprune.graph.stored import stored_values
from graphprune.graph.targets import Target
from graphprune.graph.weights import read_weight
from graphprune.pipeline.sequential import SequentialCalibration
from graphprune.quantize.config import QuantizeConfig
from graphprune.quantize.gptq_weights import canonical_weight, solve_weight
from graphprune.quantize.passes import QuantizePass

Solved = dict[str, tuple[np.ndarray, np.ndarray]]


def solve_sequentially(
    model: ir.Model,
    targets: Sequence[Target],
    config: QuantizeConfig,
    batches: list[dict[str, np.ndarray]],
    providers: Sequence[str],
    on_group: Callable[[list[Target], ActivationStats], None] | None = None,
) -> tuple[Solved, list[str]]:
    """``name -> (codes, scales)`` of every 2-D target, block by block; ``model`` ends as it began.

    ``on_group`` sees each group's statistics before it is solved (progress, or a test's check of the Grams).
    Returns the solved codes and the calibration warnings.
    """
    grid = QuantizePass.grid_of(config)
    solved: Solved = {}
    originals: dict[str, np.ndarray] = {}
    engine = SequentialCalibration(model, batches, list(providers), gram=True)

    def quantize_group(group: list[Target], stats: ActivationStats) -> None:
        if on_group:
            on_group(group, stats)
        stored = stored_values(model.graph)
        for t in group:
            if len(t.shape) != 2:  # rounded to nearest by the pass, float until then
                continue
            codes, scales = solve_weight(canonical_weight(model, t), stats.gram[t.name], grid, config)
            solved[t.name] = (codes, scales)
            weight = read_weight(stored, t)
            originals[t.name] = weight.values
            values = from_canonical(
                dequantize_codes(codes, scales, grid)[:, None, :], t.shape, t.k_axis, t.out_axis
            )
            weight.write(values.astype(weight.values.dtype))

    try:
        engine.run(targets, quantize_group)
    finally:
        stored = stored_values(model.graph)
        for t in targets:
            if t.name in originals:
                read_weight(stored, t).write(originals[t.name])
    return solved, engine.warnings
