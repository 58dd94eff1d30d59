"""How a channel axis passes through each ONNX op: the one table the coupling walker reads.

A rule says which inputs carry data to output 0 and how an axis of one maps to the other; everything else an op
has (Clip's bounds, Pow's exponent, BatchNormalization's parameters, a Reshape's target shape) is a *side* input
that must either not vary along the channels or be a per-channel constant the rewrite slices with them. An op
missing from this table ends a walk: the coupling through it is not proved.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import onnx_ir as ir


class Flow(Enum):
    """How an op moves the channels from its data inputs to output 0."""

    UNARY = "unary"  # entry by entry from input 0
    ELEMENTWISE = "elementwise"  # entry by entry from every input, broadcast together (numpy rules)
    SPATIAL = "spatial"  # NCHW, within each channel (axis 1): pooling, Resize of H/W, BatchNorm, depthwise Conv
    RESHAPE = "reshape"  # input 0's axes regrouped: located by the recorded shapes on both sides
    EXPAND = "expand"  # input 0 broadcast to a shape: every axis but the broadcast ones kept
    TRANSPOSE = "transpose"  # input 0's axes permuted by ``perm``
    MATMUL = "matmul"  # a product of two activations: batch axes kept, rows from A, columns from B
    ALONG_AXIS = "along an axis"  # acts along one axis (Softmax, Slice, Concat): any axis but the channels'
    SHAPE = "shape"  # reads the shape only: harmless where the channel count is not picked from it
    NORMALIZE = "normalize"  # mixes the channels (a norm over them), then a per-channel affine: no coupling


class Scale(Enum):
    """How a positive per-channel scale s of output 0 moves to the inputs: op(x)·s = op(x') (SmoothQuant)."""

    FIRST = "first"  # x' = (x0·s, others as they are): positively homogeneous in input 0 (Relu, Div's numerator)
    ONE = "one"  # any one input takes s, the others stay (a product)
    EVERY = "every"  # every input takes s (a sum, a maximum)
    PARAMETERS = "parameters"  # the per-channel parameters take s (a norm's weight and bias)


def _depthwise(node: ir.Node) -> bool:
    """One filter per channel (``group`` = channels, weight ``[C, 1, kh, kw]``): channel c reads channel c only."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if weight is None or weight.const_value is None:
        return False
    shape = weight.const_value.shape
    group = node.attributes.get("group")
    groups = int(group.value) if group is not None else 1
    return groups >= 2 and len(shape) >= 2 and shape[0] == groups and shape[1] == 1


def _resize_keeps_channels(node: ir.Node) -> bool:
    """A Resize scales only the spatial axes of an NCHW tensor: constant scales with 1 for the batch and the
    channels, nearest or linear sampling (at scale 1 every coordinate mode maps channel c to c), no ``axes``."""
    if "axes" in node.attributes or len(node.inputs) < 3:
        return False
    mode = node.attributes["mode"].value if "mode" in node.attributes else "nearest"
    transform = node.attributes.get("coordinate_transformation_mode")
    if mode not in ("nearest", "linear") or (transform is not None and transform.value == "tf_crop_and_resize"):
        return False
    scales = node.inputs[2]
    if scales is None or scales.const_value is None or (len(node.inputs) > 3 and node.inputs[3] is not None):
        return False
    values = scales.const_value.numpy().reshape(-1)
    return len(values) >= 2 and values[0] == 1 and values[1] == 1


@dataclass(frozen=True)
class OpRule:
    flow: Flow
    # side inputs that must not vary along the channels (Clip's bounds, Pow's exponent)
    uniform: tuple[int, ...] = ()
    # side inputs that are per-channel stored tensors, channels on axis 0 (BatchNorm's, a depthwise Conv's)
    per_channel: tuple[int, ...] = ()
    # the rule holds only when this is true of the node (else the op is not channel-preserving)
    when: Callable[[ir.Node], bool] | None = None
    # how a SmoothQuant scale passes back through the op (None: it does not, the op is not homogeneous)
    scale: Scale | None = None
    # SPATIAL: the input's rank must be recorded to place the channels on axis 1 (BatchNormalization's parameter
    # lengths already tie it to the channels where the rank is unknown)
    needs_rank: bool = True


_UNARY = (
    "Gelu Erf Tanh Sigmoid HardSigmoid HardSwish Swish Mish Elu Selu Celu Softplus Softsign Exp "
    "Cast IsNaN Not Sqrt Reciprocal"
)
_HOMOGENEOUS = "Relu LeakyRelu Neg Abs Identity Dropout"  # f(s·x) = s·f(x) for s > 0 (Cast rounds: not here)
_ELEMENTWISE = "Where And Or Equal"
_POOLS = "GlobalAveragePool GlobalMaxPool GlobalLpPool AveragePool MaxPool LpPool"

RULES: dict[str, OpRule] = {
    **{op: OpRule(Flow.UNARY) for op in _UNARY.split()},
    **{op: OpRule(Flow.UNARY, scale=Scale.FIRST) for op in _HOMOGENEOUS.split()},
    "Clip": OpRule(Flow.UNARY, uniform=(1, 2)),
    **{op: OpRule(Flow.ELEMENTWISE) for op in _ELEMENTWISE.split()},
    **{op: OpRule(Flow.ELEMENTWISE, scale=Scale.EVERY) for op in ("Add", "Sub", "Max", "Min")},
    "Mul": OpRule(Flow.ELEMENTWISE, scale=Scale.ONE),
    "Div": OpRule(Flow.ELEMENTWISE, scale=Scale.FIRST),
    "Pow": OpRule(Flow.ELEMENTWISE, uniform=(1,)),
    **{op: OpRule(Flow.SPATIAL) for op in _POOLS.split()},
    "Resize": OpRule(Flow.SPATIAL, when=_resize_keeps_channels),
    "BatchNormalization": OpRule(Flow.SPATIAL, per_channel=(1, 2, 3, 4), needs_rank=False),
    "Conv": OpRule(Flow.SPATIAL, per_channel=(1, 2), when=_depthwise),
    **{op: OpRule(Flow.RESHAPE, scale=Scale.FIRST) for op in ("Reshape", "Unsqueeze", "Squeeze")},
    "Expand": OpRule(Flow.EXPAND, scale=Scale.FIRST),
    "Transpose": OpRule(Flow.TRANSPOSE, scale=Scale.FIRST),
    "MatMul": OpRule(Flow.MATMUL, scale=Scale.ONE),
    **{op: OpRule(Flow.ALONG_AXIS) for op in ("Softmax", "LogSoftmax", "Slice", "Concat")},
    "Shape": OpRule(Flow.SHAPE),
    "LayerNormalization": OpRule(Flow.NORMALIZE, per_channel=(1, 2), scale=Scale.PARAMETERS),
    "RMSNormalization": OpRule(Flow.NORMALIZE, per_channel=(1,), scale=Scale.PARAMETERS),
}


def rule_of(node: ir.Node) -> OpRule | None:
    """The rule of a standard-domain ``node`` (None: channels do not provably pass through it)."""
    if node.domain not in ("", "ai.onnx"):
        return None
    rule = RULES.get(node.op_type)
    if rule is None or (rule.when is not None and not rule.when(node)):
        return None
    return rule


def data_inputs(node: ir.Node, rule: OpRule) -> list[int]:
    """The inputs that carry the channels into output 0 (the others are side inputs)."""
    if rule.flow in (Flow.ELEMENTWISE, Flow.MATMUL) or (rule.flow is Flow.ALONG_AXIS and node.op_type == "Concat"):
        return [i for i, v in enumerate(node.inputs) if v is not None and i not in rule.uniform]
    return [0]
