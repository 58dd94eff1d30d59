"""Can TensorRT run each pruned weight on sparse tensor cores? Decided from the ONNX file alone, on the CPU.

TensorRT uses a sparse kernel for a layer only when all of these hold (TensorRT developer guide, "Structured
Sparsity"; NVIDIA's sparsity blog posts):

* the layer is a Convolution (group 1) or a matrix multiplication by a constant weight (ONNX MatMul / Gemm with
  an initializer or Constant operand, which TensorRT's parser turns into a MatrixMultiply layer with constant
  weights);
* the weight has at most 2 non-zeros in every 4 consecutive values along the reduction axis K (for a Conv: every 4
  input channels at each output channel and kernel position);
* the math runs in FP16, BF16, INT8 or FP8 (FP32/TF32 layers never pick sparse kernels in TensorRT; an int4
  weight-only layer, int4 DequantizeLinear into a float MatMul, runs weight-only kernels, never sparse ones);
* and, for it to be worth it, the layer is big enough: NVIDIA's guidance is at least 256 input and output channels;
  below that TensorRT usually finds the dense kernel faster ("too small to gain", not an error).

Even an eligible layer may run dense: TensorRT times both and keeps the faster. Only the build log tells
(:mod:`graphprune.tensorrt.build`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
import onnx_ir as ir

from graphprune.algorithms.layout import to_canonical
from graphprune.algorithms.masks import nm_violations
from graphprune.algorithms.pattern import NMPattern
from graphprune.graph.stored import stored_values
from graphprune.graph.targets import LOOK_THROUGH, Target, find_targets
from graphprune.graph.weights import read_weight

Status = Literal["eligible", "too small to gain", "ineligible"]
SPARSE_PATTERN = NMPattern(2, 4)
MIN_CHANNELS = 256  # NVIDIA's guidance for a sparse kernel to beat the dense one
SPARSE_PRECISIONS = frozenset({"fp16", "bf16", "int8-qdq", "fp8-qdq"})
# The precision label of a weight behind DequantizeLinear, by its stored type.
_QDQ_PRECISION = {
    "int8": "int8-qdq",
    "uint8": "int8-qdq",
    "float8_e4m3fn": "fp8-qdq",
    "int4": "int4-qdq",
    "uint4": "int4-qdq",
}
_ONNX_PRECISION: dict[int, str] = {
    onnx.TensorProto.FLOAT16: "fp16",
    onnx.TensorProto.BFLOAT16: "bf16",
    onnx.TensorProto.FLOAT: "fp32",
    onnx.TensorProto.DOUBLE: "fp64",
}
_TRT_LAYER = {"MatMul": "MatrixMultiply (constant weights)", "Gemm": "MatrixMultiply (constant weights)"}


@dataclass(frozen=True, kw_only=True)
class Eligibility:
    """Whether one target can run on sparse tensor cores, and why not."""

    name: str
    op: str  # ONNX op of the consumer(s)
    trt_layer: str  # the layer TensorRT will build for it
    out_channels: int
    k: int
    precision: str  # "fp16" | "bf16" | "int8-qdq" | "fp32" | ...: the math precision of the consumer
    violations: int  # groups of 4 along K holding more than 2 non-zeros
    status: Status
    reasons: tuple[str, ...] = ()

    @property
    def pattern_ok(self) -> bool:
        return self.violations == 0 and self.k % SPARSE_PATTERN.group == 0


def assess(
    target: Target,
    weight: np.ndarray,
    precision: str,
    group: int = 1,
    min_channels: int = MIN_CHANNELS,
) -> Eligibility:
    """Eligibility of one target from its effective weight values (stored layout) and its math precision."""
    out_channels = target.shape[target.out_axis]
    k = target.k
    blocking: list[str] = []
    ops = sorted({c.op for c in target.consumers} or {target.op})
    if any(op not in ("MatMul", "Gemm", "Conv") for op in ops):
        blocking.append(f"{'/'.join(ops)} has no sparse kernels in TensorRT (only Conv and MatMul/Gemm)")
    if "Conv" in ops and group != 1:
        blocking.append(f"grouped Conv (group={group}): TensorRT's sparse convolutions need group=1")
    violations = 0
    if k % SPARSE_PATTERN.group:
        blocking.append(f"K={k} is not a multiple of 4: no 2:4 groups along K")
    else:
        canonical = to_canonical(np.asarray(weight), target.k_axis, target.out_axis)
        violations = len(nm_violations(canonical, SPARSE_PATTERN))
        if violations:
            total = canonical.size // SPARSE_PATTERN.group
            blocking.append(f"not 2:4 along K: {violations} of {total} groups of 4 have more than 2 non-zeros")
    if precision == "int4-qdq":
        blocking.append(
            "int4 weight-only: TensorRT's sparse tensor cores take FP16/BF16/INT8/FP8 layers, not int4"
        )
    elif precision not in SPARSE_PRECISIONS:
        blocking.append(
            f"{precision.upper()} math: sparse tensor cores need FP16/BF16/INT8; convert the model to FP16 "
            "(`graphprune convert`; TensorRT 11 needs it) or build with `precision=fp16` on TensorRT 10"
        )
    small = [f"{what}={n} < {min_channels}" for what, n in (("out", out_channels), ("K", k)) if n < min_channels]
    if blocking:
        status: Status = "ineligible"
        reasons = tuple(blocking)
    elif small:
        status = "too small to gain"
        reasons = (f"{', '.join(small)} channels: a dense kernel is usually as fast",)
    else:
        status, reasons = "eligible", ()
    trt_layer = "Convolution" if ops == ["Conv"] else _TRT_LAYER.get(ops[0], ops[0])
    return Eligibility(
        name=target.name,
        op="/".join(ops),
        trt_layer=trt_layer,
        out_channels=out_channels,
        k=k,
        precision=precision,
        violations=violations,
        status=status,
        reasons=reasons,
    )


def eligibility_report(
    model: ir.Model,
    targets: list[Target] | None = None,
    precision: str | None = None,
    min_channels: int = MIN_CHANNELS,
) -> list[Eligibility]:
    """One record per target (every target of the model unless given).

    ``precision`` is the math precision the build will use (for example ``"fp16"`` for a TensorRT 10 build with
    the FP16 flag); by default it is read from the model: the type the consumer multiplies in, which is the type
    of the weight as it arrives (stored, or cast), or ``int8-qdq`` under DequantizeLinear.
    """
    if targets is None:
        targets = find_targets(model).targets
    stored = stored_values(model.graph)
    made_by = {str(v.name): node for node in model.graph for v in node.outputs if v.name}
    records = []
    for target in targets:
        nodes = [made_by[c.output] for c in target.consumers if c.output in made_by]
        if not nodes:
            continue
        weight = read_weight(stored, target)
        # a quantized weight is zero where it equals its zero point
        values = weight.values if weight.zero_point is None else (weight.values != weight.zero_point)
        used = precision or _precision(target, _weight_chain(nodes[0], target.consumers[0].input_index))
        group = max((n.attributes.get_int("group", 1) for n in nodes if n.op_type == "Conv"), default=1)
        records.append(assess(target, values, used, group, min_channels))
    return records


def _weight_chain(consumer: ir.Node, index: int) -> list[ir.Value]:
    """The weight as the consumer reads it, back through look-through ops to the stored tensor (last)."""
    value = consumer.inputs[index]
    assert value is not None
    chain = [value]
    producer = value.producer()
    while producer is not None and producer.op_type in LOOK_THROUGH and producer.inputs and producer.inputs[0]:
        chain.append(producer.inputs[0])
        producer = producer.inputs[0].producer()
    return chain


def _precision(target: Target, chain: list[ir.Value]) -> str:
    """The math precision: the weight's type where the consumer reads it (MatMul/Gemm/Conv inputs share it)."""
    for value in chain:  # the op nearest the consumer decides
        producer = value.producer()
        if producer is not None and producer.op_type == "DequantizeLinear":
            return _QDQ_PRECISION.get(target.dtype, f"{target.dtype}-qdq")
        if producer is not None and producer.op_type == "Cast":
            return _ONNX_PRECISION.get(producer.attributes.get_int("to", 0), "other")
    return {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}.get(target.dtype, target.dtype)


def summary(records: list[Eligibility]) -> str:
    """One line: how many targets are eligible, too small, ineligible."""
    counts = {s: sum(r.status == s for r in records) for s in ("eligible", "too small to gain", "ineligible")}
    return ", ".join(f"{n} {s}" for s, n in counts.items())
