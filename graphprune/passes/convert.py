"""Convert an FP32 ONNX model to FP16 or BF16 computation, keeping its interface and every pruned zero.

FP16 is ONNX Runtime's converter (``onnxruntime.transformers.float16.convert_float_to_float16``) with
``keep_io_types=True`` and our list of ops kept in FP32; BF16 reuses its graph decisions and rounds the values
itself (:mod:`graphprune.passes.bf16`). What :func:`convert` does to a model:

* Float32 initializers and Constant values become half precision and computation follows them, except in the ops
  kept in FP32 (:func:`fp32_ops`), which get Casts around them. Initializers read only by those ops stay float32.
* Graph inputs and outputs keep their float32 type and names (a Cast after each input, before each output).
* Numerically sensitive ops stay in FP32: normalisations (mean and variance of a row; BatchNormalization's stored
  variance, which can exceed FP16's range), Softmax/LogSoftmax and the
  Reduce* ops (long sums), Pow and Sqrt (the RMSNorm chain: ``x**2`` overflows FP16 once ``|x| > 256``, and LLM
  hidden states have outliers far beyond that), Exp and Log (``exp(x)`` overflows FP16 for ``x > 11``), plus ONNX
  Runtime's own default list (Range, TopK, Min, Max, CumSum, ...: ops without FP16 kernels there). MatMul, Gemm and
  Conv -- the pruned ops -- always run in half precision.
* Shape arithmetic stays in its original type (:mod:`graphprune.passes.precision`): float values computed from
  shapes, sizes or indices (positions, anchor grids, strides), the values feeding shape and index inputs, and the
  cheap ops that combine index-derived values with activations on the way to an output. FP16 holds integers
  exactly only up to 2048, and TensorRT rejects the FP16/FP32 mixture a half-converted ``Range`` leaves.
  No value between two FP32 ops goes through half precision: the converter's FP32 -> half -> FP32 Cast pairs are
  removed, and a float constant shared by a kept node and a half-precision one is copied for the kept node.
  :attr:`ConvertResult.fp32_reasons` says why each node computes in FP32.
* Rounding (:func:`to_half`): zeros stay zeros (every pruned zero survives), a non-zero too small for the type
  becomes the smallest subnormal of its sign, finite values beyond the range saturate to the largest finite value:
  the set of non-zeros, the sparsity pattern, is exactly the input's. Counts are in :class:`ConvertResult`.
* IR version, opset imports, producer and metadata are kept; the nodes are left in topological order.

Memory: the model is converted in place, one tensor at a time (each initializer's FP32 bytes are replaced by its
half-precision bytes before the next is read), and type inference is onnx-ir's, which hands ONNX a copy without
the weights' data, so a model over 2 GB is never serialised as one protobuf (its peak memory: BENCHMARKS.md,
"Figures moved out of the code"). The weights must be in memory: a model loaded without
its external data is refused with a one-line error.

Not supported (one-line error): subgraphs (If/Loop/Scan bodies), models that already compute in half precision,
tensors whose type ONNX inference cannot tell.

Testing on the CPU: ONNX Runtime's CPU provider has FP16 kernels for only some ops and runs the others in FP32
behind casts it inserts itself, so a CPU run checks the rounding at op boundaries, not every op's FP16 arithmetic.
It has almost no BF16 kernels.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphprune.errors import GraphpruneError
from graphprune.passes.precision import keep_fp32

HalfType = Literal["float16", "bfloat16"]

# Ours: ops whose FP16 arithmetic loses the result (see the module docstring).
SENSITIVE_OPS: frozenset[str] = frozenset(
    {
        "BatchNormalization",  # a running variance can pass FP16's range (9.8e7 in PP-OCRv4's text detector)
        "LayerNormalization",
        "SimplifiedLayerNormalization",
        "SkipLayerNormalization",
        "SkipSimplifiedLayerNormalization",
        "GroupNormalization",
        "InstanceNormalization",
        "MeanVarianceNormalization",
        "LpNormalization",
        "RMSNormalization",
        "Softmax",
        "LogSoftmax",
        "ReduceMean",
        "ReduceSum",
        "ReduceSumSquare",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "CumSum",
        "Pow",
        "Sqrt",
        "Exp",
        "Log",
    }
)
SENSITIVE = "numerically sensitive or without FP16 kernels (fp32_ops)"
ASKED = "asked for (fp32_nodes)"
CONSTANT = "constant read only by FP32 nodes"
_SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan"})
_HALF_TYPES = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
_FP16_MIN_POSITIVE = float(np.finfo(np.float16).smallest_subnormal)
_FP16_MAX = float(np.finfo(np.float16).max)


def _ort_float16() -> Any:  # lazily: onnxruntime is an extra ([cpu] or [gpu])
    try:
        from onnxruntime.transformers import float16
    except ImportError as exc:
        raise GraphpruneError("convert needs onnxruntime: pip install 'graphprune[cpu]' (or '[gpu]')") from exc
    return float16


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """The logger shows warnings and errors only while the block runs, then its own level again (a library
    leaves the process's logging as it found it)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def fp32_ops() -> frozenset[str]:
    """The ops kept in FP32: ours and ONNX Runtime's default block list."""
    return SENSITIVE_OPS | frozenset(_ort_float16().DEFAULT_OP_BLOCK_LIST)


@dataclass
class RoundingStats:
    """What rounding float32 values to half precision did to them."""

    values: int = 0
    raised_from_zero: int = 0  # non-zeros below the smallest subnormal, kept non-zero at +-smallest subnormal
    saturated: int = 0  # finite values beyond the largest finite half value, clamped to it

    def add(self, other: RoundingStats) -> None:
        self.values += other.values
        self.raised_from_zero += other.raised_from_zero
        self.saturated += other.saturated


@dataclass(kw_only=True)
class ConvertResult:
    """The converted model (the input object, changed in place) and what the conversion did."""

    model: onnx.ModelProto
    dtype: HalfType
    converted: list[str] = field(default_factory=list)  # initializers stored in half precision
    kept_fp32: list[str] = field(default_factory=list)  # float32 initializers left as they are (FP32-only readers)
    fp32_nodes: list[str] = field(default_factory=list)  # nodes computing in FP32
    fp32_reasons: dict[str, str] = field(default_factory=dict)  # node -> why it computes in FP32
    casts_inserted: int = 0
    rounding: RoundingStats = field(default_factory=RoundingStats)

    @property
    def modified(self) -> bool:
        return bool(self.converted or self.casts_inserted)

    def fp32_summary(self) -> str:
        """What stayed in FP32 and why, one clause per reason with the first few nodes."""
        by_reason: dict[str, list[str]] = defaultdict(list)
        for node, reason in self.fp32_reasons.items():
            by_reason[reason].append(node)
        parts = []
        for reason, nodes in by_reason.items():
            shown = ", ".join(nodes[:3]) + (f", ... ({len(nodes) - 3} more)" if len(nodes) > 3 else "")
            parts.append(f"{len(nodes)} {reason} ({shown})")
        return "; ".join(parts) if parts else "nothing"


def rounding_stats(values: np.ndarray, dtype: HalfType) -> RoundingStats:
    """How many of the float32 ``values`` plain rounding to ``dtype`` would zero (:func:`to_half` raises them to
    the smallest subnormal) or make infinite (:func:`to_half` saturates them)."""
    src = np.asarray(values, dtype=np.float32)
    with np.errstate(over="ignore"):
        plain = src.astype(np.float16 if dtype == "float16" else ml_dtypes.bfloat16)
    lost = int(np.count_nonzero((src != 0) & (plain == 0)))
    overflow = int(np.count_nonzero(np.isfinite(src) & ~np.isfinite(plain)))
    return RoundingStats(int(src.size), lost, overflow)


def to_half(values: np.ndarray, dtype: HalfType) -> tuple[np.ndarray, RoundingStats]:
    """Round float32 ``values`` to ``dtype``: zeros stay zeros, non-zeros stay non-zero, overflow saturates.

    FP16 is ONNX Runtime's rounding (clamp into the finite non-zero range, then round to nearest even); BF16 is
    :func:`graphprune.passes.bf16.to_bfloat16`, the same rule for BF16's range.
    """
    src = np.asarray(values, dtype=np.float32)
    stats = rounding_stats(src, dtype)
    if dtype == "bfloat16":
        from graphprune.passes.bf16 import to_bfloat16

        return to_bfloat16(src), stats
    return _ort_float16().convert_np_to_float16(src, _FP16_MIN_POSITIVE, _FP16_MAX), stats


def convert(
    model: onnx.ModelProto,
    dtype: HalfType = "float16",
    fp32_op_types: frozenset[str] | None = None,
    fp32_nodes: frozenset[str] = frozenset(),
) -> ConvertResult:
    """Convert ``model`` in place to ``dtype`` computation with an FP32 interface; see the module docstring.

    ``fp32_op_types`` defaults to :func:`fp32_ops`; ``fp32_nodes`` names further nodes to keep in FP32.
    """
    if dtype not in ("float16", "bfloat16"):
        raise GraphpruneError(f"unsupported half type {dtype!r}: use float16 or bfloat16")
    _check_supported(model, dtype)
    blocked = fp32_ops() if fp32_op_types is None else fp32_op_types
    _constants_as_tensors(model.graph)
    inferred = _inferred_value_info(model)
    reasons = _keep_shape_arithmetic(model, inferred, blocked, fp32_nodes)
    kept = frozenset(fp32_nodes) | frozenset(reasons)
    nodes_before = len(model.graph.node)
    casts_before = _count_casts(model.graph)
    stats = {
        key: rounding_stats(numpy_helper.to_array(t), dtype)
        for key, t in _float_tensors(model, nodes_before).items()
    }
    bf16 = None
    if dtype == "bfloat16":
        from graphprune.passes.bf16 import Bf16Values

        bf16 = Bf16Values.capture(model)  # our own rounding of the same values, kept aside at half the size
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred)
    float16 = _ort_float16()
    with _quiet(float16.__name__):  # it logs every clamped value at DEBUG/INFO
        float16.convert_float_to_float16(
            model,
            min_positive_val=_FP16_MIN_POSITIVE,
            max_finite_val=_FP16_MAX,
            keep_io_types=True,
            disable_shape_infer=True,  # done above on a copy without weights: no >2 GB protobuf
            op_block_list=sorted(blocked),
            node_block_list=sorted(kept),
        )
    result = ConvertResult(model=model, dtype=dtype)
    for (name, position), tensor in _float_tensors(model, nodes_before).items():
        if (name, position) not in stats:  # ConstantOfShape's default fill, written by the converter
            continue
        if tensor.data_type == TensorProto.FLOAT:
            result.kept_fp32.append(name)
        else:
            result.converted.append(name)
            result.rounding.add(stats[(name, position)])
    for node in model.graph.node[:nodes_before]:
        if node.name in reasons:
            result.fp32_reasons[node.name] = reasons[node.name]
        elif node.op_type in blocked:
            result.fp32_reasons[node.name or node.op_type] = SENSITIVE
        elif node.name in fp32_nodes:
            result.fp32_reasons[node.name] = ASKED
    result.fp32_nodes = list(result.fp32_reasons)
    if bf16 is not None:
        bf16.apply(model)
    _drop_round_trips(model.graph, TensorProto.BFLOAT16 if dtype == "bfloat16" else TensorProto.FLOAT16)
    result.casts_inserted = _count_casts(model.graph) - casts_before
    _sort_topologically(model.graph)  # after bf16.apply, which finds the original nodes by position
    return result


def _keep_shape_arithmetic(
    model: onnx.ModelProto, inferred: list[onnx.ValueInfoProto], blocked: frozenset[str], asked: frozenset[str]
) -> dict[str, str]:
    """Name -> reason for the nodes :func:`graphprune.passes.precision.keep_fp32` keeps, plus the Constant nodes
    read only by FP32 nodes; the constants they share with half-precision readers are copied for them, so no
    value on an FP32 path goes through half precision. Nodes to keep get a unique name (the converter's block list
    goes by name)."""
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output, *inferred]}
    types.update((t.name, t.data_type) for t in graph.initializer)
    kept = keep_fp32(graph, types)
    names = [node.name for node in graph.node]
    taken = set(names)
    for index in kept:
        node = graph.node[index]
        if not node.name or names.count(node.name) > 1:
            node.name = _unique(f"{node.op_type}_{node.output[0] if node.output else index}", taken)
    reasons = {graph.node[i].name: reason for i, reason in kept.items()}
    fp32 = {n.name for n in graph.node if n.name and (n.name in reasons or n.name in asked)}
    fp32.update(n.name for n in graph.node if n.op_type in blocked and n.name)
    _private_constants(graph, set(reasons), fp32, blocked, taken)
    constants_read: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            constants_read[name].append(node)
    for node in graph.node:
        if node.op_type != "Constant" or not node.output or not _is_float_constant(node):
            continue
        readers = constants_read.get(node.output[0], [])
        if readers and all(r.op_type in blocked or (r.name and r.name in fp32) for r in readers):
            node.name = node.name if node.name and names.count(node.name) <= 1 else _unique("Constant", taken)
            reasons[node.name] = CONSTANT
    return reasons


def _private_constants(
    graph: onnx.GraphProto, shape_nodes: set[str], fp32: set[str], blocked: frozenset[str], taken: set[str]
) -> None:
    """Give the shape-arithmetic nodes their own copy of each float constant they share with a node the converter
    will turn to half precision (which would round the constant and cast it back)."""
    initializers = {t.name: t for t in graph.initializer if t.data_type == TensorProto.FLOAT}
    constants = {n.output[0]: i for i, n in enumerate(graph.node) if n.op_type == "Constant" and n.output}
    half_readers = {
        name for n in graph.node if n.op_type not in blocked and n.name not in fp32 for name in n.input if name
    }
    copies: dict[str, str] = {}
    for node in list(graph.node):
        if node.name not in shape_nodes:
            continue
        for position, name in enumerate(node.input):
            if name not in half_readers or (name not in initializers and name not in constants):
                continue
            if name not in copies:
                copies[name] = _unique(f"{name}.fp32", taken)
                if name in initializers:
                    copy = graph.initializer.add()
                    copy.CopyFrom(initializers[name])
                    copy.name = copies[name]
                else:
                    clone = onnx.NodeProto()
                    clone.CopyFrom(graph.node[constants[name]])
                    clone.name, clone.output[0] = _unique("Constant", taken), copies[name]
                    graph.node.insert(constants[name] + 1, clone)
                    constants = {n.output[0]: i for i, n in enumerate(graph.node) if n.op_type == "Constant"}
            node.input[position] = copies[name]


def _is_float_constant(node: onnx.NodeProto) -> bool:
    return any(a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT for a in node.attribute)


def _unique(base: str, taken: set[str]) -> str:
    name, suffix = base, 1
    while name in taken:
        name, suffix = f"{base}_{suffix}", suffix + 1
    taken.add(name)
    return name


def _count_casts(graph: onnx.GraphProto) -> int:
    return sum(node.op_type == "Cast" for node in graph.node)


def _cast_to(node: onnx.NodeProto) -> int | None:
    if node.op_type != "Cast":
        return None
    return next((a.i for a in node.attribute if a.name == "to"), None)


def _drop_round_trips(graph: onnx.GraphProto, half: int) -> None:
    """Remove every FP32 -> half -> FP32 round trip the converter leaves between FP32 nodes (it casts each blocked
    node's output to half and back for a blocked reader): ``Cast(to=float)`` of ``Cast(to=half)(x)`` reads ``x``
    itself, and disappears where ``x`` is already float32 (an Identity before a graph output); Casts left without
    readers go."""
    outputs = {v.name for v in graph.output}
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]}
    types.update((t.name, t.data_type) for t in graph.initializer)
    producer = {out: node for node in graph.node for out in node.output if out}
    renamed: dict[str, str] = {}
    for node in graph.node:
        first = producer.get(node.input[0]) if _cast_to(node) == TensorProto.FLOAT else None
        if first is None or _cast_to(first) != half:
            continue
        node.input[0] = first.input[0]
        if types.get(first.input[0]) != TensorProto.FLOAT:
            continue
        if node.output[0] in outputs:  # a graph output keeps its name: the Cast becomes an Identity
            node.op_type = "Identity"
            del node.attribute[:]
        else:
            renamed[node.output[0]] = first.input[0]
    for node in graph.node:
        for position, name in enumerate(node.input):
            if name in renamed:
                node.input[position] = renamed[name]
    while True:
        read = {name for node in graph.node for name in node.input} | outputs
        dead = [i for i, n in enumerate(graph.node) if n.op_type == "Cast" and not (set(n.output) & read)]
        if not dead:
            return
        for i in reversed(dead):
            del graph.node[i]


def _check_supported(model: onnx.ModelProto, dtype: HalfType) -> None:
    graph = model.graph
    for node in graph.node:
        if node.op_type in _SUBGRAPH_OPS or any(a.type in (a.GRAPH, a.GRAPHS) for a in node.attribute):
            raise GraphpruneError(
                f"node {node.name or node.op_type!r} ({node.op_type}) has a subgraph: convert does not handle "
                "If/Loop/Scan bodies yet"
            )
        if node.op_type == "Cast" and any(a.name == "to" and a.i in _HALF_TYPES for a in node.attribute):
            raise GraphpruneError(
                f"node {node.name or node.op_type!r} casts to half precision: convert expects an FP32 model"
            )
    if any(t.data_type in _HALF_TYPES for t in graph.initializer):
        raise GraphpruneError("the model already stores half-precision weights: convert expects an FP32 model")
    for value in [*graph.input, *graph.output]:
        if value.type.tensor_type.elem_type in _HALF_TYPES:
            raise GraphpruneError(f"{value.name!r} is already half precision: convert expects an FP32 model")
    for tensor in graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL and tensor.data_type == TensorProto.FLOAT:
            raise GraphpruneError(
                f"initializer {tensor.name!r} is external data that was not loaded: load the model with its data"
            )
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if dtype == "bfloat16" and opset < 13:
        raise GraphpruneError(f"bfloat16 needs opset 13 or newer, the model has opset {opset}: use float16")


def _constants_as_tensors(graph: onnx.GraphProto) -> None:
    """Constant nodes with ``value_float(s)`` hold a tensor instead: ONNX Runtime's converter only rewrites tensor
    attributes, so a float attribute would leave the Constant FP32 where the graph expects FP16."""
    for node in graph.node:
        if node.op_type != "Constant":
            continue
        for position, attr in enumerate(node.attribute):
            if attr.name in ("value_float", "value_floats"):
                values = np.array(attr.f if attr.name == "value_float" else list(attr.floats), np.float32)
                node.attribute[position].CopyFrom(helper.make_attribute("value", numpy_helper.from_array(values)))


def _float_tensors(model: onnx.ModelProto, nodes: int) -> dict[tuple[str, int], TensorProto]:
    """Stored float values (float32 before conversion, float32 or half after) keyed by (initializer name, -1),
    or (node output, attribute position) for the Constant values and ConstantOfShape fills of the first ``nodes``
    nodes."""
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16)
    found = {(t.name, -1): t for t in model.graph.initializer if t.data_type in floats}
    for node in model.graph.node[:nodes]:
        for position, attr in enumerate(node.attribute):
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in floats:
                found[(node.output[0] if node.output else node.name, position)] = attr.t
    return found


def _inferred_value_info(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Types of every intermediate tensor, from onnx-ir's shape inference (which hands ONNX a copy without the
    weights' data: no >2 GB protobuf); one-line error for a tensor whose type stays unknown."""
    import onnx_ir as ir
    from onnx_ir.passes.common import ShapeInferencePass

    graph_model = ir.from_proto(model)  # wraps the TensorProtos, copies no weight
    ShapeInferencePass(check_type=False, strict_mode=False)(graph_model)
    outputs = [v for node in graph_model.graph for v in node.outputs if v.name]
    untyped = sorted(str(v.name) for v in outputs if v.dtype is None)
    if untyped:
        raise GraphpruneError(
            f"ONNX type inference gives no type for {len(untyped)} tensor(s) (first: {untyped[0]!r}); "
            "convert needs every tensor's type"
        )
    graph_outputs = {v.name for v in graph_model.graph.outputs}
    return [ir.serde.serialize_value(v) for v in outputs if v.name not in graph_outputs]


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """ONNX Runtime's converter appends its Casts at the end: order the nodes again (Kahn's algorithm, taking the
    earliest ready node first, so an order that was already valid is kept)."""
    nodes = list(graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    waiting = [0] * len(nodes)
    readers: dict[int, list[int]] = defaultdict(list)
    for i, node in enumerate(nodes):
        for dep in {producer[name] for name in node.input if name in producer}:
            waiting[i] += 1
            readers[dep].append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for reader in readers[i]:
            waiting[reader] -= 1
            if waiting[reader] == 0:
                heapq.heappush(ready, reader)
    if len(order) != len(nodes):
        raise GraphpruneError("the converted graph has a cycle")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)
