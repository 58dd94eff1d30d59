"""The MatMuls that multiply two activations (attention's Q·Kᵀ and probabilities·V) and what is known of their
operands' ranges.

Neither operand of such a MatMul is a weight, so each gets its own per-tensor static scale: measured by a range
tap (one ``[rows, 1]`` reduction, :mod:`graphprune.quantize.ranges`), except for a softmax's probabilities, which
lie in [0, 1] by definition and take that range without calibration (a calibrated maximum below 1 would clip a
more peaked distribution seen later). TensorRT's INT8 BERT engines quantize both of these batched MatMuls the
same way; ONNX Runtime's CPU optimiser turns DQ → MatMul ← DQ into ``MatMulIntegerToFloat`` whatever the
operands' int8/uint8 kinds (measured: BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from graphprune.quantize.ranges import RangeTap

PROBABILITIES = (0.0, 1.0)  # the range of a softmax's output


@dataclass(frozen=True)
class ActivationMatMul:
    """A main-graph MatMul of two activations: its node's name (may be empty), its operands (which identify
    it) and which of them are probabilities."""

    node: str
    inputs: tuple[str, str]
    probabilities: tuple[bool, bool]

    def taps(self) -> list[RangeTap]:
        """One per-tensor tap per operand whose range is not known in advance."""
        return [RangeTap(x, -1, 1) for x, known in zip(self.inputs, self.probabilities, strict=True) if not known]


def find_activation_matmuls(graph: ir.Graph) -> list[ActivationMatMul]:
    """Every float MatMul of the main graph whose two operands both depend on a graph input."""
    dynamic = {id(v) for v in graph.inputs}
    found = []
    for node in graph:  # topological order: an operand's producer came first
        if any(id(v) in dynamic for v in node.inputs if v is not None):
            dynamic.update(id(v) for v in node.outputs)
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        a, b = node.inputs
        if a is None or b is None or not (id(a) in dynamic and id(b) in dynamic):
            continue
        if any(v.dtype not in (None, ir.DataType.FLOAT) for v in (a, b)):
            continue  # fp16/bf16 graphs: their Q/DQ scales would need their own type
        found.append(
            ActivationMatMul(node.name or "", (str(a.name), str(b.name)), (_is_softmax(a), _is_softmax(b)))
        )
    return found


def _is_softmax(value: ir.Value) -> bool:
    """A softmax's output, directly or through the exporter's guard ``Where(IsNaN(p), 0, p)``."""
    node = value.producer()
    if node is not None and node.op_type == "Where" and is_nan_guard(node):
        node = node.inputs[2].producer()  # type: ignore[union-attr]  # checked by is_nan_guard
    return node is not None and node.op_type == "Softmax" and node.domain in ("", "ai.onnx")


def is_nan_guard(where: ir.Node) -> bool:
    """``Where(IsNaN(p), 0, p)``: NaN probabilities (a fully masked row) replaced by zeros."""
    if len(where.inputs) != 3:
        return False
    cond, zero, p = where.inputs
    test = cond.producer() if cond is not None else None
    return test is not None and test.op_type == "IsNaN" and p is not None and test.inputs[0] is p and is_zero(zero)


def constant_scalar(value: ir.Value | None) -> float | None:
    """The value of a one-element constant (initializer or Constant node), else None."""
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is None or tensor.size != 1:
        return None
    return float(tensor.numpy().reshape(-1)[0])


def is_zero(value: ir.Value | None) -> bool:
    """A constant that holds one element, 0."""
    return constant_scalar(value) == 0.0
