"""Which weights a quantization run turns into Q/DQ, and why every other weight-like tensor stays float.

A weight is quantized when it is a float initializer read directly (no Transpose or Cast between) as input 1 of
MatMul (a 2-D ``[K, N]`` weight), Gemm or Conv(group=1), in the main graph. The head (the final projection to a
model output) and the weights a Gather also reads (embedding tables tied to the head) stay float by default; so
does everything the caller excludes. Each weight left float is a :class:`Kept` record with its reason: the report
lists them, because each one counts against the speed a quantized model reaches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import onnx_ir as ir

from graphprune.algorithms.pattern import Unstructured
from graphprune.graph.selection import select_targets
from graphprune.graph.targets import FLOAT_DTYPES, QUANTIZED_WEIGHT_INPUT, Target, find_targets
from graphprune.graph.types import value_types
from graphprune.quantize.attention import ActivationMatMul, find_activation_matmuls
from graphprune.quantize.config import QuantizeConfig
from graphprune.quantize.ranges import RangeTap


@dataclass(frozen=True)
class Kept:
    """A weight left in float (or in the quantized form it came in), and why."""

    name: str
    op: str
    reason: str


@dataclass(frozen=True)
class Planned:
    """The weights to quantize, the activation tensors their consumers read (one tap each), the rest, and the
    MatMuls of two activations to quantize (their operands' taps are among ``activations``)."""

    targets: list[Target]
    activations: list[RangeTap]
    kept: list[Kept]
    matmuls: list[ActivationMatMul] = field(default_factory=list)


def plan_quantization(model: ir.Model, config: QuantizeConfig) -> Planned:
    scan = find_targets(model, include_head=config.include_head)
    chosen = select_targets(scan, Unstructured(0.5), (), config.exclude)
    by_name = {s.name: Kept(s.name, s.op, _reworded(s.reason)) for s in chosen.skips}
    by_name.update((k.name, k) for k in _quantized_operators(model))  # a clearer reason than "not handled"
    kept = list(by_name.values())
    types = value_types(model)
    targets: list[Target] = []
    taps: dict[str, RangeTap] = {}
    for target in chosen.targets:
        reason = _unfit(model.graph, target, config)
        if reason:
            kept.append(Kept(target.name, target.op, reason))
            continue
        targets.append(target)
        for c in target.consumers:
            rank = types.get(c.activation, (0, None))[1]
            axis = c.activation_axis
            if axis >= 0:
                axis = axis - rank if rank is not None else axis
            taps.setdefault(c.activation, RangeTap(c.activation, axis, target.k, rank))
    matmuls = _activation_matmuls(model, config)
    for m in matmuls:
        for tap in m.taps():
            taps.setdefault(tap.value, tap)
    return Planned(targets, list(taps.values()), kept, matmuls)


def _activation_matmuls(model: ir.Model, config: QuantizeConfig) -> list[ActivationMatMul]:
    """Attention's activation x activation MatMuls, when asked for and static scales exist for them."""
    if not (config.bmm and config.quantizes_activations and not config.dynamic):
        return []
    found = find_activation_matmuls(model.graph)
    return [m for m in found if not any(fnmatchcase(m.node, pattern) for pattern in config.exclude)]


def _reworded(reason: str) -> str:
    """The target finder speaks of pruning; a tied table is left float for the same reason."""
    return reason.replace("which would see the pruned values", "which would read the quantized values")


def _unfit(graph: ir.Graph, target: Target, config: QuantizeConfig) -> str:
    if target.dtype not in FLOAT_DTYPES:
        return f"already quantized ({target.dtype} under DequantizeLinear): left as it is"
    value = graph.initializers.get(target.name)
    if value is None:
        return "stored in a Constant node, not an initializer"
    if any(c.in_subgraph for c in target.consumers):
        return "read inside a subgraph (If/Loop/Scan body), where its activations cannot be measured"
    if target.through:
        return f"reaches its consumer through {', '.join(target.through)}"
    if any(c.input_index != 1 for c in target.consumers):
        return "the weight is the first operand of its MatMul/Gemm (W @ X): no per-channel activation grid"
    ops = {c.op for c in target.consumers}
    if "MatMul" in ops and len(target.shape) != 2:
        return f"batched MatMul weight of rank {len(target.shape)}"
    # int4 takes any K: where it is not a multiple of the block size, the last block of each row is shorter, as
    # ONNX's blocked DequantizeLinear allows (the scale holds ceil(K / block_size) entries along K)
    if config.precision == "int4" and ops != {"MatMul"} and ops != {"Gemm"}:
        return "int4 weight-only quantization covers MatMul/Gemm weights, not Conv"
    return ""


def _quantized_operators(model: ir.Model) -> list[Kept]:
    """Weights already held by ONNX Runtime's quantized operators: they stay as they are."""
    kept = []
    for node in model.graph:
        index = QUANTIZED_WEIGHT_INPUT.get(node.op_type)
        weight = node.inputs[index] if index is not None and len(node.inputs) > index else None
        if weight is not None and weight.is_initializer():
            kept.append(Kept(str(weight.name), node.op_type, f"already quantized ({node.op_type}): left as it is"))
    return kept


def already_quantized(kept: Sequence[Kept]) -> list[str]:
    return [k.name for k in kept if k.reason.startswith("already quantized")]
