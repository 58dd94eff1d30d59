"""QuantizePass: float weights to symmetric codes behind DequantizeLinear, activations through Q → DQ.

An ``onnx_ir`` in-place pass (``QuantizePass(config=..., targets=..., ranges=...)(model)``, composable with
``ir.passes.Sequential``). Weights come from :mod:`graphprune.algorithms.quant_grid` (round to nearest) unless
``solved`` holds codes computed elsewhere (GPTQ, or the pruning solvers' joint mode, named by ``solved_by``).
Activations get static per-tensor scales from ``ranges`` (their calibrated min/max, or ``clips``' fraction of it),
or DynamicQuantizeLinear with ``config.dynamic``; int4 leaves them float.
Pre-condition: every target is a float initializer of the model, every static activation has a finite range.
Post-condition: every weight is stored as codes behind one DequantizeLinear whose zero points are all 0 (and so
are the activations' for TensorRT and fp8), and every weight that was N:M along K (for M in 4, 8, 16) still
holds at most as many non-zeros per group.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import cast

import numpy as np
import onnx_ir as ir

from graphprune.algorithms.layout import from_canonical, to_canonical
from graphprune.algorithms.quant_grid import QuantGrid, dequantize_codes, grid_scales, quantize_codes
from graphprune.graph.stored import stored_values
from graphprune.graph.targets import Target
from graphprune.graph.weights import read_weight
from graphprune.passes.base import PassPostconditionError, PassPreconditionError
from graphprune.quantize.attention import PROBABILITIES, ActivationMatMul
from graphprune.quantize.clip import clipped_range
from graphprune.quantize.config import QuantizeConfig
from graphprune.quantize.qdq import CODE_TYPES, Names, dequantize_weight, quantize_activation
from graphprune.quantize.ranges import ChannelRange

GROUPS = (4, 8, 16)  # the M of the N:M patterns whose group counts the pass promises to keep
_FP8_MAX = 448.0


@dataclass(frozen=True)
class WeightRecord:
    name: str
    op: str
    shape: tuple[int, ...]
    precision: str
    method: str
    relative_error: float  # ‖W - Q(W)‖ / ‖W‖
    sparsity: float  # zeros among the codes


@dataclass(frozen=True)
class ActivationRecord:
    name: str
    consumers: int
    low: float | None  # calibrated range (None: dynamic)
    high: float | None
    scale: float | None
    zero_point: float | None
    clip: float = 1.0  # the scale's range as a fraction of the calibrated max |x| (1: min/max)


@dataclass(frozen=True)
class MatMulRecord:
    """A MatMul of two activations, both operands through Q → DQ (``low``/``high`` 0/1: a softmax's output)."""

    node: str
    operands: tuple[ActivationRecord, ActivationRecord]


@dataclass
class QuantizeResult(ir.passes.PassResult):
    weights: list[WeightRecord] = field(default_factory=list)
    activations: list[ActivationRecord] = field(default_factory=list)
    matmuls: list[MatMulRecord] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "weights": [asdict(w) for w in self.weights],
            "activations": [asdict(a) for a in self.activations],
            "activation_matmuls": [asdict(m) for m in self.matmuls],
        }


def activation_grid(config: QuantizeConfig, low: float, high: float) -> tuple[float, np.ndarray, str]:
    """Per-tensor scale, zero point and code kind for an activation range [low, high]."""
    if config.precision == "fp8":
        amax = max(abs(low), abs(high))
        return (amax / _FP8_MAX or 1.0), np.zeros((), CODE_TYPES["fp8"][0]), "fp8"
    if config.target == "ort":  # asymmetric uint8, the range widened to hold 0 exactly
        lo, hi = min(low, 0.0), max(high, 0.0)
        scale = (hi - lo) / 255.0 or 1.0
        zero = np.array(np.clip(np.rint(-lo / scale), 0, 255), np.uint8)
        return scale, zero, "uint8"
    amax = max(abs(low), abs(high))
    return (amax / 127.0 or 1.0), np.zeros((), np.int8), "int8"


def group_maxima(nonzero: np.ndarray) -> dict[int, int]:
    """Most non-zeros in any group of M consecutive weights along K of a canonical ``(out, R, K)`` mask."""
    k = nonzero.shape[-1]
    return {m: int(nonzero.reshape(-1, k // m, m).sum(axis=2).max(initial=0)) for m in GROUPS if k % m == 0}


class QuantizePass(ir.passes.InPlacePass):
    """Quantize ``targets`` (found by :func:`graphprune.quantize.select.plan_quantization`) in place."""

    def __init__(
        self,
        *,
        config: QuantizeConfig,
        targets: Sequence[Target],
        ranges: Mapping[str, ChannelRange] | None = None,
        solved: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
        solved_by: str | None = None,
        clips: Mapping[str, float] | None = None,
        matmuls: Sequence[ActivationMatMul] = (),
    ) -> None:
        super().__init__()
        self.config = config
        self.targets = list(targets)
        self.matmuls = list(matmuls)
        self.ranges = ranges or {}
        self.solved = solved or {}
        self.solved_by = solved_by or config.method  # the report's method for the solved weights
        self.clips = clips or {}  # per activation, a fraction of its max |x| (graphprune.quantize.clip)
        self._groups_before: dict[str, dict[int, int]] = {}
        self._readers: list[ir.Node] = []  # the MatMul/Gemm/Conv nodes whose weight is quantized
        self._added: list[ir.Node] = []  # the static activation Q/DQ nodes
        self._bmm_nodes: list[ir.Node] = []  # the activation x activation MatMuls quantized

    @staticmethod
    def grid_of(config: QuantizeConfig) -> QuantGrid:
        """The weights' grid: per output channel, or per block along K for int4."""
        return QuantGrid(
            precision=config.precision, block_size=config.block_size if config.precision == "int4" else None
        )

    @property
    def grid(self) -> QuantGrid:
        return self.grid_of(self.config)

    def requires(self, model: ir.Model) -> None:
        initializers = model.graph.initializers
        for t in self.targets:
            value = initializers.get(t.name)
            if value is None or value.const_value is None:
                raise PassPreconditionError(f"weight {t.name} is not an initializer of this model")
            if value.const_value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
                raise PassPreconditionError(f"weight {t.name} is not float ({value.const_value.dtype.name})")
        if self.config.quantizes_activations and not self.config.dynamic:
            for name in {c.activation for t in self.targets for c in t.consumers}:
                r = self.ranges.get(name)
                if r is None or not (np.isfinite(r.lo).all() and np.isfinite(r.hi).all()):
                    raise PassPreconditionError(f"activation {name} has no finite calibrated range")
        if self.matmuls and (self.config.dynamic or not self.config.quantizes_activations):
            raise PassPreconditionError("activation x activation MatMuls need static activation scales")
        for m in self.matmuls:
            if self._matmul_node(model.graph, m) is None:
                raise PassPreconditionError(f"no MatMul of {m.inputs[0]} and {m.inputs[1]} in this model")
            for name, known in zip(m.inputs, m.probabilities, strict=True):
                r = self.ranges.get(name)
                if not known and (r is None or not (np.isfinite(r.lo).all() and np.isfinite(r.hi).all())):
                    raise PassPreconditionError(f"activation {name} has no finite calibrated range")

    def __call__(self, model_or_result: ir.Model | ir.passes.PassResult, /) -> QuantizeResult:
        # this pass's own result type (onnx-ir types it as a plain PassResult)
        return cast(QuantizeResult, super().__call__(model_or_result))

    def call(self, model: ir.Model) -> QuantizeResult:
        graph = model.graph
        names = Names(graph)
        order = {node: i for i, node in enumerate(graph)}
        stored = stored_values(graph)
        weights = [self._weight(graph, names, order, stored, t) for t in self.targets]
        activations = self._activations(graph, names) if self.config.quantizes_activations else []
        matmuls = [self._matmul(graph, names, m) for m in self.matmuls]
        return QuantizeResult(model, bool(weights), weights, activations, matmuls)

    @staticmethod
    def _matmul_node(graph: ir.Graph, m: ActivationMatMul) -> ir.Node | None:
        """The main-graph MatMul that reads exactly ``m``'s operands (an unnamed node has nothing else)."""
        for node in graph:
            if node.op_type == "MatMul" and tuple(str(v.name) if v else "" for v in node.inputs) == m.inputs:
                return node
        return None

    def _matmul(self, graph: ir.Graph, names: Names, m: ActivationMatMul) -> MatMulRecord:
        """Q → DQ on both operands of ``m``, per tensor: the calibrated range, or [0, 1] for probabilities."""
        node = self._matmul_node(graph, m)
        assert node is not None  # checked by requires
        records = []
        for index, (x, known) in enumerate(zip(list(node.inputs), m.probabilities, strict=True)):
            assert x is not None
            low, high = PROBABILITIES if known else self.ranges[str(x.name)].tensor_range()
            scale, zero, kind = activation_grid(self.config, low, high)
            self._added += quantize_activation(graph, names, x, [(node, index)], scale, zero, kind)
            records.append(ActivationRecord(str(x.name), 1, low, high, scale, float(zero.astype(np.float32))))
        self._bmm_nodes.append(node)
        return MatMulRecord(m.node, (records[0], records[1]))

    def _weight(
        self, graph: ir.Graph, names: Names, order: dict[ir.Node, int], stored: Mapping[str, ir.Value], t: Target
    ) -> WeightRecord:
        w = read_weight(stored, t).values.astype(np.float32)
        canonical = to_canonical(w, t.k_axis, t.out_axis)  # (out, R, K)
        self._groups_before[t.name] = group_maxima(canonical != 0)
        flat = canonical.reshape(canonical.shape[0], -1)
        grid = self.grid
        if t.name in self.solved:
            codes, scales = self.solved[t.name]
            method = self.solved_by
        else:
            scales = grid_scales(flat, grid)
            codes = quantize_codes(flat, scales, grid)
            method = "rtn"
        error = float(
            np.linalg.norm(dequantize_codes(codes, scales, grid) - flat) / max(np.linalg.norm(flat), 1e-30)
        )
        stored_codes = from_canonical(codes.reshape(canonical.shape), w.shape, t.k_axis, t.out_axis)
        block = stored_block(t.k, grid.block_size, self.config.target) if grid.block_size else None
        if block:  # scales per stored block along K, laid out like the weight with K shortened
            per_block = scales[:, grid.scale_columns(t.k)[::block]]  # each stored block's grid scale
            scale = from_canonical(
                per_block[:, None, :], _blocked(w.shape, t.k_axis, per_block.shape[1]), t.k_axis, t.out_axis
            )
            axis = t.k_axis
        else:
            scale, axis = scales[:, 0], t.out_axis
        weight = graph.initializers[t.name]
        readers = [u.node for u in weight.uses()]
        self._readers.extend(r for r in readers if r not in self._readers)
        first = min(readers, key=lambda n: order.get(n, 0))
        dequantize_weight(graph, names, weight, stored_codes, scale, self.config.precision, first, axis, block)
        zeros = float(np.count_nonzero(codes.astype(np.float32) == 0) / codes.size)
        return WeightRecord(
            t.name, t.op, tuple(w.shape), self.config.precision, method, round(error, 6), round(zeros, 6)
        )

    def _activations(self, graph: ir.Graph, names: Names) -> list[ActivationRecord]:
        consumers: dict[ir.Value, list[tuple[ir.Node, int]]] = {}
        for node in self._readers:
            x = node.inputs[0]
            assert x is not None
            consumers.setdefault(x, []).append((node, 0))
        records = []
        for x, uses in consumers.items():
            activation = str(x.name)
            if self.config.dynamic:
                quantize_activation(graph, names, x, uses, None, None, "uint8")
                records.append(ActivationRecord(activation, len(uses), None, None, None, None))
                continue
            low, high = self.ranges[activation].tensor_range()
            fraction = self.clips.get(activation, 1.0)
            # the arithmetic of clip.candidate_grids, so the scale is the very candidate the clip run scored
            clipped = clipped_range(low, high, fraction * max(abs(low), abs(high)))
            scale, zero, kind = activation_grid(self.config, *clipped)
            self._added += quantize_activation(graph, names, x, uses, scale, zero, kind)
            zero_point = float(zero.astype(np.float32))
            records.append(ActivationRecord(activation, len(uses), low, high, scale, zero_point, fraction))
        return records

    def ensures(self, model: ir.Model) -> None:
        graph = model.graph
        if self.config.target == "tensorrt" or self.config.precision == "fp8":  # symmetric activations too
            for node in self._added:
                zero = node.inputs[2].const_value  # type: ignore[union-attr]
                if zero is None or zero.numpy().astype(np.float32) != 0:
                    raise PassPostconditionError(f"activation {node.inputs[0].name}: a zero point is not 0")  # type: ignore[union-attr]
        for node in self._bmm_nodes:
            producers = [x.producer() if x is not None else None for x in node.inputs]
            if any(p is None or p.op_type != "DequantizeLinear" for p in producers):
                raise PassPostconditionError(f"MatMul {node.name}: an operand is not read through DQ")
        for t in self.targets:
            weight = graph.initializers[t.name]
            readers = [u.node for u in weight.uses()]
            if len(readers) != 1 or readers[0].op_type != "DequantizeLinear":
                raise PassPostconditionError(f"weight {t.name} is not read by exactly one DequantizeLinear")
            dq = readers[0]
            zero = dq.inputs[2]
            if (
                zero is None
                or zero.const_value is None
                or np.any(zero.const_value.numpy().astype(np.float32) != 0)
            ):
                raise PassPostconditionError(f"weight {t.name}: a zero point is not 0")
            codes = weight.const_value.numpy().astype(np.float32)  # type: ignore[union-attr]  # a stored weight
            after = group_maxima(to_canonical(codes, t.k_axis, t.out_axis) != 0)
            for m, before in self._groups_before.get(t.name, {}).items():
                if after[m] > before:
                    raise PassPostconditionError(
                        f"weight {t.name}: a group of {m} along K holds {after[m]} non-zeros, {before} before"
                    )


def stored_block(k: int, block_size: int, target: str) -> int:
    """The ``block_size`` the file's DequantizeLinear carries for a reduction axis of ``k`` on a grid of
    ``block_size``: the grid's own, or, where ``k`` is not a multiple of it and the ``target`` is TensorRT,
    ``gcd(k, block_size)`` with each grid scale repeated over its stored blocks.

    ONNX lets the last block be shorter (the scale holds ceil(k / block_size) entries along K; ONNX Runtime reads
    it and fuses it into MatMulNBits), but TensorRT's blocked dequantization has no block size of its own: it
    reads ``k / scale entries`` as the block, and refuses a scale that does not tile K (TensorRT-RTX 1.7:
    "The quantization axis must divide into whole blocks"), or reads blocks of the wrong length where it does
    (K=192 and 2 scales: blocks of 96, not 128 and 64). ``gcd(k, block_size)`` tiles both K and every grid
    block, so the repeated scales give the very same weights in every runtime.
    """
    if target == "ort" or k % block_size == 0:
        return block_size
    return math.gcd(k, block_size)


def _blocked(shape: tuple[int, ...], k_axis: int, blocks: int) -> tuple[int, ...]:
    return tuple(blocks if a == k_axis else n for a, n in enumerate(shape))
