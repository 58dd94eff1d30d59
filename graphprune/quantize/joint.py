"""The joint prune-and-quantize mode's Q/DQ model: the solver's own codes and scales, written as they are.

``apply`` with a ``quantize`` grid prunes with SparseGPT or ALPS, whose kept weights land on the grid as they are
solved (:func:`graphprune.algorithms.gptq.prune_and_quantize`); the pruning pass writes them as float values
``code · scale`` and records the codes and scales on each weight's value (``GRID_CODES``). This step turns that
model into the one ``quantize`` writes, through the same pass (:class:`~graphprune.quantize.passes.QuantizePass`):

* each recorded weight is stored as the solver's codes behind DequantizeLinear with the solver's scales (int8 and
  fp8 per output channel, int4 per block along K), never rounded again: the DequantizeLinear output equals the
  pruned float weights bit for bit, which is checked here before anything is written;
* int8 and fp8 activations get static Q → DQ scales from the same calibration data, measured on the pruned model
  (running min/max inside ONNX Runtime, :mod:`~graphprune.quantize.ranges`), as ``quantize`` measures them on
  the model it is given; int4 is weight-only;
* the weights ``quantize`` would leave float (the head, tables a Gather reads) keep their float values on the
  grid, and the report lists each with its reason.

The activation grid is TensorRT's (symmetric int8, zero point 0); smoothing is not applied (it would move the
weights off the solver's grid).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx_ir as ir

from graphprune.algorithms.layout import to_canonical
from graphprune.algorithms.quant_grid import QuantGrid, dequantize_codes
from graphprune.calibration.request import CalibrationRequest
from graphprune.errors import GraphpruneError
from graphprune.graph.stored import stored_values
from graphprune.graph.targets import Target
from graphprune.graph.weights import read_weight
from graphprune.passes.base import GRID_CODES
from graphprune.quantize.config import QuantizeConfig
from graphprune.quantize.opset import require_opset
from graphprune.quantize.passes import QuantizePass, QuantizeResult
from graphprune.quantize.ranges import ChannelRange, collect_ranges
from graphprune.quantize.select import Kept, plan_quantization

NOT_SOLVED = "not pruned by the solver, so not on its grid"


@dataclass
class JointReport:
    """What the Q/DQ step of a joint run wrote: weights with the solver's codes, activations, float weights."""

    precision: str
    block_size: int | None
    result: QuantizeResult
    kept: list[Kept] = field(default_factory=list)
    opset_raised_from: int | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "precision": self.precision,
            "block_size": self.block_size,
            **self.result.to_dict(),
            "kept_float": [asdict(k) for k in self.kept],
            "opset_raised_from": self.opset_raised_from,
            "warnings": self.warnings,
        }


def joint_config(grid: QuantGrid, include_head: bool = False, exclude: tuple[str, ...] = ()) -> QuantizeConfig:
    """The ``quantize`` options a joint grid writes as Q/DQ; a one-line error for a grid Q/DQ does not express
    the way ``quantize`` writes it (int8 and fp8 take one scale per output channel, int4 blocks of 32, 64, 128)."""
    if grid.precision != "int4" and grid.block_size is not None:
        raise GraphpruneError(
            f"{grid.precision} Q/DQ weights take one scale per output channel; blocks along K are for int4"
        )
    config = QuantizeConfig(
        precision=grid.precision,
        block_size=grid.block_size or 128,
        include_head=include_head,
        exclude=exclude,
    )
    config.validate()
    return config


def prepare_opset(model: ir.Model, grid: QuantGrid) -> int | None:
    """Raise the opset to what the grid's Q/DQ needs (before the long work: an inexact upgrade fails first)."""
    return require_opset(model, joint_config(grid).opset, f"{grid.precision} Q/DQ")


def write_joint_qdq(
    model: ir.Model,
    grid: QuantGrid,
    pruned: Sequence[Target],
    calibration: CalibrationRequest | None,
    *,
    include_head: bool = False,
    exclude: tuple[str, ...] = (),
    label: str = "joint",
) -> JointReport:
    """Turn the pruned ``model`` (weights ``pruned`` solved on ``grid``) into its Q/DQ model, in place.

    ``calibration`` feeds the activation ranges of int8 and fp8 (None: synthetic inputs, with their warning).
    ``label`` is the weights' method in the report (e.g. ``sparsegpt+int4``).
    """
    config = joint_config(grid, include_head, exclude)
    if QuantizePass.grid_of(config) != grid:
        raise GraphpruneError(f"the grid {grid.to_dict()} is not the one the Q/DQ writer reads")
    raised = require_opset(model, config.opset, f"{grid.precision} Q/DQ")
    plan = plan_quantization(model, config)
    solved_names = {t.name for t in pruned}
    stored = stored_values(model.graph)
    targets = [t for t in plan.targets if t.name in solved_names]
    kept = [k for k in plan.kept if k.name in solved_names]
    kept += [Kept(t.name, t.op, NOT_SOLVED) for t in plan.targets if t.name not in solved_names]
    solved = {t.name: _solver_codes(stored[t.name], t, grid) for t in targets}
    ranges: dict[str, ChannelRange] = {}
    warnings: list[str] = []
    if config.quantizes_activations and targets:
        read = {c.activation for t in targets for c in t.consumers}
        taps = [tap for tap in plan.activations if tap.value in read]
        ranges, warnings = collect_ranges(model, taps, calibration or CalibrationRequest())
    result = QuantizePass(config=config, targets=targets, ranges=ranges, solved=solved, solved_by=label)(model)
    return JointReport(grid.precision, grid.block_size, result, kept, raised, warnings)


def _solver_codes(value: ir.Value, target: Target, grid: QuantGrid) -> tuple[np.ndarray, np.ndarray]:
    """The codes and scales the solver recorded for ``target``, proved to dequantize to its stored weights."""
    solved = value.meta.get(GRID_CODES)
    if solved is None:
        raise GraphpruneError(f"weight {target.name} holds no codes from the solver: it cannot be written as Q/DQ")
    codes, scales = solved
    weight = read_weight({target.name: value}, target).values
    canonical = to_canonical(weight, target.k_axis, target.out_axis).reshape(codes.shape)
    if not np.array_equal(dequantize_codes(codes, scales, grid).astype(weight.dtype), canonical):
        # a step after the solver moved the weight off its grid: writing the codes would change the model
        raise GraphpruneError(f"weight {target.name} changed after the solver rounded it; its codes are stale")
    return codes, scales
