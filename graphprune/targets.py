"""Find the weights that feed matrix multiplications, with their reduction axis K, or say why not.

A *target* is a stored tensor (an initializer or the value of a Constant node) that reaches the weight operand
of MatMul, Gemm or Conv(group=1), possibly through Identity, Transpose, Cast or DequantizeLinear. Everything
that looks like a weight but cannot be pruned safely becomes a :class:`Skip` with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Consumer:
    """One node that multiplies by the weight."""

    node: str  # node name (made unique by graphprune if the model has empty or repeated names)
    op: str  # "MatMul" | "Gemm" | "Conv"
    input_index: int  # which input of the node receives the (transformed) weight
    activation: str  # tensor multiplied by the weight: its channel axis runs along K
    activation_axis: int  # axis of ``activation`` that is K (negative counts from the end)
    output: str  # the node's first output


@dataclass(frozen=True)
class Target:
    """A prunable weight: where it is stored and how its consumers see it."""

    name: str  # stored tensor name: an initializer or a Constant node's output
    op: str  # op of the first consumer
    shape: tuple[int, ...]  # stored shape
    dtype: str  # stored dtype, numpy name ("float32", "float16", "bfloat16", "int8" under DequantizeLinear)
    k_axis: int  # reduction axis K, in the stored tensor's coordinates (non-negative)
    out_axis: int  # output-neuron axis, in the stored tensor's coordinates (non-negative)
    consumers: tuple[Consumer, ...]
    through: tuple[str, ...] = ()  # ops looked through between storage and consumer, storage first
    is_head: bool = False  # the final projection to a model output (left dense unless asked)

    @property
    def k(self) -> int:
        return self.shape[self.k_axis]


@dataclass(frozen=True)
class Skip:
    """A weight-like tensor left untouched, and why."""

    name: str
    op: str
    reason: str
