"""Convert an FP32 ONNX model to FP16 or BF16 computation, keeping its interface and every pruned zero.

What the pass does (``ConvertToHalf(dtype).call(model)``):

* Float32 initializers and Constant values become half precision, computation follows them: every float32 tensor
  of the graph is computed in half precision, except in the ops kept in FP32 (below).
* Graph inputs and outputs keep their float32 type and their names: a Cast to half follows each float input, a Cast
  back to float32 precedes each float output.
* Numerically sensitive ops stay in FP32 with Casts around them (:data:`DEFAULT_FP32_OPS`):

  - normalisations (LayerNormalization and friends): mean and variance of a row of activations;
  - Softmax / LogSoftmax: a sum of exponentials over a whole row;
  - ReduceMean / ReduceSum / ReduceSumSquare / ReduceL1 / ReduceL2 / ReduceLogSum(Exp) and CumSum: long sums;
  - Pow and Sqrt: the RMSNorm chain ``Pow(x, 2) -> ReduceMean -> Add(eps) -> Sqrt``; ``x**2`` overflows FP16 as
    soon as ``|x| > 256``, and LLM hidden states have outliers far beyond that;
  - Exp and Log: ``exp(x)`` overflows FP16 for ``x > 11``, and log of FP16 subnormals is coarse.

  Erf, Tanh, Sigmoid and Gelu stay in half precision: their outputs are bounded and FP16 gives them about three
  significant digits, which is what the matrix multiplications around them keep anyway. MatMul, Gemm and Conv (the
  pruned ops) are the point of the conversion and always run in half precision.
  Initializers consumed only by FP32 ops (LayerNorm scale and bias, the exponent of Pow) stay float32, unrounded.
* Rounding of stored values (:func:`to_half`): zeros stay zeros (every pruned zero survives), a non-zero value too
  small for the target type becomes the smallest subnormal of its sign instead of zero, so the set of non-zeros --
  the sparsity pattern -- is exactly the input's; finite values beyond the range saturate to the largest finite
  value instead of becoming infinity. The counts are in :class:`ConvertResult`.
* IR version, opset imports, producer and metadata are copied unchanged. Value infos of float tensors are
  rewritten with the new type.

Not supported (clear error): subgraphs (If/Loop/Scan bodies) and models whose float32 tensors have no inferable
type.

Note for testing on the CPU: ONNX Runtime's CPU provider has FP16 kernels for only some ops and runs the others in
FP32 behind casts that it inserts itself, so a CPU run checks the rounding of weights and activations at op
boundaries, not every op's FP16 arithmetic. It has almost no BF16 kernels.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphprune.errors import GraphpruneError

HalfType = Literal["float16", "bfloat16"]

DEFAULT_FP32_OPS: frozenset[str] = frozenset(
    {
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

# Inputs that the ONNX specification types as float32 whatever the data type of the rest of the node.
_FLOAT32_ONLY_INPUTS: dict[str, frozenset[int]] = {"Resize": frozenset({2}), "Upsample": frozenset({1})}
# Ops whose attribute, not an input, decides the float type they produce.
_DTYPE_ATTRIBUTES: dict[str, str] = {
    "Cast": "to",
    "EyeLike": "dtype",
    "RandomNormal": "dtype",
    "RandomUniform": "dtype",
    "RandomNormalLike": "dtype",
    "RandomUniformLike": "dtype",
    "Bernoulli": "dtype",
}
_SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan"})
_ONNX_TYPE: dict[str, int] = {"float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}
_NUMPY_TYPE: dict[str, type] = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}

HALF, FP32 = "half", "fp32"


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


@dataclass
class ConvertResult:
    """The converted model and what the conversion did."""

    model: onnx.ModelProto
    dtype: HalfType
    converted: list[str] = field(default_factory=list)  # initializers / Constant outputs stored in half precision
    kept_fp32: list[str] = field(default_factory=list)  # initializers kept float32 (FP32-only consumers)
    fp32_nodes: list[str] = field(default_factory=list)  # nodes kept in FP32
    casts_inserted: int = 0
    rounding: RoundingStats = field(default_factory=RoundingStats)


def to_half(values: np.ndarray, dtype: HalfType) -> tuple[np.ndarray, RoundingStats]:
    """Round float32 ``values`` to ``dtype``: zeros stay zeros, non-zeros stay non-zero, overflow saturates."""
    target = _NUMPY_TYPE[dtype]
    info = ml_dtypes.finfo(target)
    src = np.asarray(values, dtype=np.float32)
    with np.errstate(over="ignore"):
        out = src.astype(target)
    finite = np.isfinite(src)
    overflow = finite & ~np.isfinite(out)
    if overflow.any():
        out[overflow] = np.where(src[overflow] > 0, info.max, -info.max).astype(target)
    lost = (src != 0) & (out == 0)
    if lost.any():
        tiny = np.asarray(info.smallest_subnormal, dtype=target)
        out[lost] = np.where(src[lost] > 0, tiny, -tiny).astype(target)
    return out, RoundingStats(int(src.size), int(lost.sum()), int(overflow.sum()))


def half_tensor(tensor: TensorProto, dtype: HalfType) -> tuple[TensorProto, RoundingStats]:
    """A float32 TensorProto rounded to ``dtype`` with :func:`to_half`, same name and dims."""
    values, stats = to_half(numpy_helper.to_array(tensor), dtype)
    if dtype == "float16":
        converted = numpy_helper.from_array(values, tensor.name)
    else:  # numpy_helper does not know ml_dtypes.bfloat16: raw bytes in little-endian order
        converted = helper.make_tensor(
            tensor.name, TensorProto.BFLOAT16, list(tensor.dims), values.view(np.uint16).tobytes(), raw=True
        )
    return converted, stats


class ConvertToHalf:
    """Graph pass: FP32 model -> FP16/BF16 model with FP32 interface (not in place: returns a new model)."""

    in_place = False

    def __init__(
        self,
        dtype: HalfType = "float16",
        fp32_ops: frozenset[str] = DEFAULT_FP32_OPS,
        fp32_nodes: frozenset[str] = frozenset(),
    ) -> None:
        if dtype not in _ONNX_TYPE:
            raise GraphpruneError(f"unsupported half type {dtype!r}: use float16 or bfloat16")
        self.dtype: HalfType = dtype
        self.fp32_ops = fp32_ops
        self.fp32_nodes = fp32_nodes

    def call(self, model: onnx.ModelProto) -> ConvertResult:
        _check_supported(model, self.dtype)
        out = copy.deepcopy(model)
        result = ConvertResult(out, self.dtype)
        _Rewriter(out.graph, _float32_tensors(model), self, result).run()
        return result


def _check_supported(model: onnx.ModelProto, dtype: HalfType) -> None:
    for node in model.graph.node:
        if node.op_type in _SUBGRAPH_OPS or any(a.type in (a.GRAPH, a.GRAPHS) for a in node.attribute):
            raise GraphpruneError(
                f"node {node.name or node.op_type!r} ({node.op_type}) has a subgraph: convert does not handle "
                "If/Loop/Scan bodies yet"
            )
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if dtype == "bfloat16" and opset < 13:
        raise GraphpruneError(f"bfloat16 needs opset 13 or newer, the model has opset {opset}: use --fp16")
    if any(
        i.data_type == TensorProto.FLOAT16 or i.data_type == TensorProto.BFLOAT16 for i in model.graph.initializer
    ):
        raise GraphpruneError("the model already stores half-precision weights: convert expects an FP32 model")


def _float32_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of the float32 tensors of the graph, from the declared types and ONNX shape inference."""
    light = _without_weight_data(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False)
    except Exception as exc:  # inference errors are many and undocumented; report them as one line
        raise GraphpruneError(f"ONNX type inference failed on the model: {exc}".splitlines()[0]) from exc
    graph = inferred.graph
    known: dict[str, int] = {}
    for info in [*graph.input, *graph.output, *graph.value_info]:
        if info.type.HasField("tensor_type"):
            known[info.name] = info.type.tensor_type.elem_type
    for init in model.graph.initializer:
        known[init.name] = init.data_type
    for node in model.graph.node:
        if node.op_type == "Constant":
            known[node.output[0]] = _constant_type(node)
    untyped = sorted({o for n in model.graph.node for o in n.output if o and known.get(o, 0) == 0})
    if untyped:
        raise GraphpruneError(
            f"ONNX type inference gives no type for {len(untyped)} tensor(s) (first: {untyped[0]!r}); "
            "convert needs every tensor's type"
        )
    return {name for name, t in known.items() if t == TensorProto.FLOAT}


def _without_weight_data(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose initializers are typed graph inputs: type inference without copying (possibly >2 GB) data."""
    light = onnx.ModelProto()
    light.CopyFrom(model) if model.ByteSize() < (1 << 30) else _copy_without(model, light)
    inputs = {i.name for i in light.graph.input}
    for init in light.graph.initializer:
        if init.name not in inputs:
            light.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    del light.graph.initializer[:]
    return light


def _copy_without(model: onnx.ModelProto, light: onnx.ModelProto) -> None:
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.graph.node.extend(model.graph.node)
    light.graph.input.extend(model.graph.input)
    light.graph.output.extend(model.graph.output)
    light.graph.value_info.extend(model.graph.value_info)
    for init in model.graph.initializer:
        light.graph.initializer.add(name=init.name, data_type=init.data_type, dims=init.dims)


def _constant_type(node: onnx.NodeProto) -> int:
    for attr in node.attribute:
        if attr.name == "value":
            return attr.t.data_type
        if attr.name in ("value_float", "value_floats"):
            return TensorProto.FLOAT
        if attr.name in ("value_int", "value_ints"):
            return TensorProto.INT64
        if attr.name in ("value_string", "value_strings"):
            return TensorProto.STRING
    return 0


class _Rewriter:
    """Decides the precision of every float32 tensor and rewrites the graph in place (on a copy)."""

    def __init__(self, graph: onnx.GraphProto, floats: set[str], options: ConvertToHalf, result: ConvertResult):
        self.g = graph
        self.floats = floats
        self.opt = options
        self.res = result
        self.half_type = _ONNX_TYPE[options.dtype]
        self.inits = {i.name: i for i in graph.initializer}
        self.constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
        self.taken = {o for n in graph.node for o in n.output} | set(self.inits) | {i.name for i in graph.input}
        self.casts: dict[tuple[str, str], str] = {}
        self.new_nodes: list[onnx.NodeProto] = []
        self.fp32_copies: dict[str, np.ndarray] = {}

    # --- which precision each consumer slot wants and each tensor has -------------------------------------
    def _fp32_node(self, node: onnx.NodeProto) -> bool:
        return node.op_type in self.opt.fp32_ops or (bool(node.name) and node.name in self.opt.fp32_nodes)

    def _wanted(self, node: onnx.NodeProto, index: int) -> str:
        if self._fp32_node(node) or index in _FLOAT32_ONLY_INPUTS.get(node.op_type, ()):
            return FP32
        return HALF

    def run(self) -> None:
        g = self.g
        consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        for node in g.node:
            for i, name in enumerate(node.input):
                if name in self.floats:
                    consumers[name].append((node, i))
        graph_outputs = {o.name for o in g.output}
        native = self._native_precisions(consumers, graph_outputs)
        self._convert_storage(native, consumers)
        self._convert_dtype_attributes(native)
        for node in list(g.node):
            for i, name in enumerate(node.input):
                if name in self.floats and name in native:
                    want = self._wanted(node, i)
                    if want != native[name]:
                        node.input[i] = self._version(name, want)
        self._restore_output_types(native)
        self.res.fp32_nodes = [n.name or n.op_type for n in g.node if self._fp32_node(n)]
        self._splice_new_nodes()
        self._retype_value_info(native)

    def _native_precisions(
        self, consumers: dict[str, list[tuple[onnx.NodeProto, int]]], graph_outputs: set[str]
    ) -> dict[str, str]:
        """The precision in which each float32 tensor is produced after conversion."""
        native: dict[str, str] = {}
        for inp in self.g.input:
            if inp.name in self.floats and inp.name not in self.inits:
                native[inp.name] = FP32
        for name in self.floats:
            if name in self.inits or name in self.constants:
                wants = {self._wanted(n, i) for n, i in consumers.get(name, [])}
                only_fp32 = wants == {FP32} or (not wants and name in graph_outputs)
                native[name] = FP32 if only_fp32 else HALF
        for node in self.g.node:
            if node.op_type == "Constant":
                continue
            for out in node.output:
                if out in self.floats:
                    native[out] = FP32 if self._fp32_node(node) else HALF
                    if node.op_type == "Cast":  # a Cast to float feeding only FP32 consumers need not round
                        wants = {self._wanted(n, i) for n, i in consumers.get(out, [])}
                        if wants == {FP32} or (not wants and out in graph_outputs):
                            native[out] = FP32
        return native

    # --- storage: initializers and Constant values -------------------------------------------------------
    def _convert_storage(
        self, native: dict[str, str], consumers: dict[str, list[tuple[onnx.NodeProto, int]]]
    ) -> None:
        for index, init in enumerate(self.g.initializer):
            if init.name in self.floats and native.get(init.name) == HALF:
                converted, stats = half_tensor(init, self.opt.dtype)
                self.g.initializer[index].CopyFrom(converted)
                self.res.converted.append(init.name)
                self.res.rounding.add(stats)
            elif init.name in self.floats:
                self.res.kept_fp32.append(init.name)
        for name, node in self.constants.items():
            if name in self.floats and native.get(name) == HALF:
                tensor = _constant_tensor(node)
                converted, stats = half_tensor(tensor, self.opt.dtype)
                del node.attribute[:]
                node.attribute.append(helper.make_attribute("value", converted))
                self.res.converted.append(name)
                self.res.rounding.add(stats)

    def _convert_dtype_attributes(self, native: dict[str, str]) -> None:
        for node in self.g.node:
            if node.op_type == "ConstantOfShape" and node.output[0] in self.floats:
                if native[node.output[0]] == HALF:
                    self._half_constant_of_shape(node)
                continue
            attr_name = _DTYPE_ATTRIBUTES.get(node.op_type)
            if attr_name is None or not node.output or native.get(node.output[0]) != HALF:
                continue
            attr = next((a for a in node.attribute if a.name == attr_name), None)
            if attr is None:  # Random* default to float32
                node.attribute.append(helper.make_attribute(attr_name, self.half_type))
            elif attr.i == TensorProto.FLOAT:
                attr.i = self.half_type

    def _half_constant_of_shape(self, node: onnx.NodeProto) -> None:
        attr = next((a for a in node.attribute if a.name == "value"), None)
        tensor = attr.t if attr is not None else numpy_helper.from_array(np.zeros(1, np.float32), "value")
        converted, stats = half_tensor(tensor, self.opt.dtype)
        self.res.rounding.add(stats)
        if attr is not None:
            attr.t.CopyFrom(converted)
        else:
            node.attribute.append(helper.make_attribute("value", converted))

    # --- casts -------------------------------------------------------------------------------------------
    def _version(self, name: str, want: str) -> str:
        """Name of ``name`` in precision ``want``, creating the Cast (or float32 initializer copy) once."""
        key = (name, want)
        if key in self.casts:
            return self.casts[key]
        new = self._fresh(f"{name}__{want}")
        if want == FP32 and name in self.fp32_copies:
            self.g.initializer.append(numpy_helper.from_array(self.fp32_copies[name], new))
            self.res.kept_fp32.append(new)
        else:
            to = TensorProto.FLOAT if want == FP32 else self.half_type
            self.new_nodes.append(helper.make_node("Cast", [name], [new], name=self._fresh(f"{new}/Cast"), to=to))
            self.res.casts_inserted += 1
        self.casts[key] = new
        return new

    def _restore_output_types(self, native: dict[str, str]) -> None:
        """A float output computed in half precision: rename it inside the graph, Cast back under its own name."""
        for out in self.g.output:
            if out.name not in self.floats or native.get(out.name) != HALF:
                continue
            inner = self._fresh(f"{out.name}__{HALF}")
            for node in self.g.node:
                node.output[:] = [inner if o == out.name else o for o in node.output]
                node.input[:] = [inner if i == out.name else i for i in node.input]
            for node in self.new_nodes:
                node.input[:] = [inner if i == out.name else i for i in node.input]
            if out.name in self.inits:  # an initializer that is also a graph output
                for init in self.g.initializer:
                    if init.name == out.name:
                        init.name = inner
            native[inner] = HALF
            self.new_nodes.append(
                helper.make_node("Cast", [inner], [out.name], name=self._fresh(f"{out.name}/Cast"), to=1)
            )
            self.res.casts_inserted += 1

    def _splice_new_nodes(self) -> None:
        """Insert each Cast right after the producer of its input (graph inputs and stored values: at the top)."""
        position = {o: i for i, n in enumerate(self.g.node) for o in n.output}
        buckets: dict[int, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.new_nodes:
            buckets[position.get(node.input[0], -1)].append(node)
        nodes = list(buckets.get(-1, []))
        for i, node in enumerate(self.g.node):
            nodes.append(node)
            nodes.extend(buckets.get(i, []))
        del self.g.node[:]
        self.g.node.extend(nodes)

    def _retype_value_info(self, native: dict[str, str]) -> None:
        for info in self.g.value_info:
            if info.name in self.floats and native.get(info.name) == HALF:
                info.type.tensor_type.elem_type = self.half_type
        for inp in self.g.input:  # an initializer listed as graph input (IR < 4) follows its storage type
            if inp.name in self.inits and native.get(inp.name) == HALF:
                inp.type.tensor_type.elem_type = self.half_type

    def _fresh(self, base: str) -> str:
        name, n = base, 1
        while name in self.taken:
            n += 1
            name = f"{base}_{n}"
        self.taken.add(name)
        return name


def _constant_tensor(node: onnx.NodeProto) -> TensorProto:
    for attr in node.attribute:
        if attr.name == "value":
            return attr.t
        if attr.name == "value_float":
            return numpy_helper.from_array(np.array(attr.f, dtype=np.float32), "value")
        if attr.name == "value_floats":
            return numpy_helper.from_array(np.array(list(attr.floats), dtype=np.float32), "value")
    raise GraphpruneError(f"Constant node {node.name!r} has no float value")
