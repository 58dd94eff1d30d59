"""Which float computations of a model must stay in FP32 when the rest goes to half precision: shape arithmetic.

FP16 holds every integer exactly only up to 2048 (BF16 up to 256), so a float value computed from a shape, a size
or an index (a sequence position, an anchor grid, an image size, a slice end) changes past that once it is rounded
to half precision, and TensorRT rejects the FP16/FP32 mixture a half-converted ``Range`` leaves behind. Three
dataflow rules find those values on the ONNX graph; each kept node carries the rule as its reason:

* **forward** (:data:`SHAPE_ARITHMETIC`): a float value is *index-derived* when it comes from integer values
  (``Shape``, ``Size``, indices, integer inputs and constants: every integer tensor) through ops that read no
  activation: every float input is index-derived or a constant, and at least one input is index-derived or
  integer. Weight-reading ops (MatMul, Conv, Gather from a table, ...) join only when their float inputs are
  index-derived or computed from constants (a rotary embedding's positions times its expanded frequencies), or for
  a MatMul whose constant has a contracted dimension of 1 (an outer product), never through a weight. A float
  constant beyond the half-precision range (a ``-3.4e38`` mask fill) ends the rule: the converter saturates it as
  before.
* **backward** (:data:`FEEDS_SHAPE`): every float value on the way to an input that is a shape or an index
  (``Reshape``/``Expand``/``Tile``/``ConstantOfShape`` shapes, ``Slice`` bounds, ``Range``, ``Resize`` sizes and
  scales, ...), walking back from that input through everything but heavy ops and ``Shape``/``Size``.
* **output coordinates** (:data:`COORDINATES`): an op that combines an index-derived value with activations
  (anchor grid + predicted offsets, times the strides), and everything after it, when its result reaches a graph
  output through cheap ops only (no MatMul/Conv): the coordinates a detector returns.

Everything else (MatMul, Conv and their activations, norms under the existing rules) is the converter's to decide.
Kept nodes cost little: shape arithmetic works on a handful of numbers, output coordinates on one tensor.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

SHAPE_ARITHMETIC = "shape arithmetic: computed from shapes, sizes or indices"
FEEDS_SHAPE = "feeds a shape or index input"
COORDINATES = "index-derived values combined with activations on the way to a graph output (coordinates, pooling)"

# Ops whose arithmetic is heavy or reads weights: never kept for the rules above (unless fully index-derived).
HEAVY_OPS: frozenset[str] = frozenset(
    {"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "Attention", "MultiHeadAttention", "LSTM", "GRU", "RNN"}
)
_TABLE_OPS = frozenset({"Gather", "GatherElements", "GatherND"})  # a float table read at integer indices
_VALUE_FREE_OPS = frozenset({"Shape", "Size"})  # outputs depend on the input's shape only
_GENERATORS = frozenset({"Range", "ConstantOfShape"})  # values made from shape arguments
_INDEXED = _TABLE_OPS | {"ScatterElements", "ScatterND"}  # their index inputs (for the backward rule) pick values

# Inputs (by position) that an op reads as a shape, a count, an axis or an index, never as data.
SHAPE_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,),
    "Expand": (1,),
    "Tile": (1,),
    "ConstantOfShape": (0,),
    "Range": (0, 1, 2),
    "Slice": (1, 2, 3, 4),
    "Resize": (1, 2, 3),
    "Upsample": (1,),
    "Pad": (1, 3),
    "TopK": (1,),
    "OneHot": (1,),
    "Split": (1,),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "Trilu": (1,),
    "CumSum": (1,),
    "ReduceMean": (1,),
    "ReduceSum": (1,),
    "ReduceMax": (1,),
    "ReduceMin": (1,),
    "ReduceProd": (1,),
    "ReduceSumSquare": (1,),
    "ReduceL1": (1,),
    "ReduceL2": (1,),
    "ReduceLogSum": (1,),
    "ReduceLogSumExp": (1,),
    "Gather": (1,),
    "GatherElements": (1,),
    "GatherND": (1,),
    "ScatterElements": (1,),
    "ScatterND": (1,),
}
_FLOAT = TensorProto.FLOAT
_HALF_MAX = float(np.finfo(np.float16).max)


class _Graph:
    """Producers, readers, types and constants of an ONNX graph, by value name."""

    def __init__(self, graph: onnx.GraphProto, types: dict[str, int]) -> None:
        self.nodes = list(graph.node)
        self.types = types
        self.producer = {out: i for i, node in enumerate(self.nodes) for out in node.output if out}
        self.readers: dict[str, list[int]] = defaultdict(list)
        for i, node in enumerate(self.nodes):
            for name in dict.fromkeys(node.input):
                if name:
                    self.readers[name].append(i)
        self.outputs = {v.name for v in graph.output}
        self.tensors: dict[str, TensorProto] = {t.name: t for t in graph.initializer}
        for node in self.nodes:
            if node.op_type == "Constant" and node.output:
                attr = next((a for a in node.attribute if a.name == "value"), None)
                self.tensors[node.output[0]] = attr.t if attr is not None else TensorProto()
        self._fits: dict[str, bool] = {}

    def is_float(self, name: str) -> bool:
        return self.types.get(name) == _FLOAT

    def is_integer(self, name: str) -> bool:
        elem = self.types.get(name)
        return elem is not None and elem not in (_FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16)

    def constant_fits_half(self, name: str) -> bool:
        """A constant whose finite values all lie within the half-precision range (not a ``-3.4e38`` fill)."""
        if name not in self._fits:
            tensor = self.tensors[name]
            values = numpy_helper.to_array(tensor) if tensor.data_type == _FLOAT else np.zeros(0)
            finite = values[np.isfinite(values)]
            self._fits[name] = bool(finite.size == 0 or np.abs(finite).max() <= _HALF_MAX)
        return self._fits[name]


def keep_fp32(graph: onnx.GraphProto, types: dict[str, int]) -> dict[int, str]:
    """Node index -> reason, for the nodes whose float computation must stay FP32 (see the module docstring).

    ``types`` maps every value name (inputs, initializers, intermediate tensors) to its ONNX element type.
    Constant nodes are not listed: the converter keeps a constant read only by kept nodes in FP32 by itself.
    """
    g = _Graph(graph, types)
    derived, forward = _forward(g)
    kept = dict.fromkeys(forward, SHAPE_ARITHMETIC)
    for index in _backward(g, derived):
        kept.setdefault(index, FEEDS_SHAPE)
    for index in _coordinates(g, derived):
        kept.setdefault(index, COORDINATES)
    return {i: reason for i, reason in sorted(kept.items()) if g.nodes[i].op_type != "Constant"}


def _forward(g: _Graph) -> tuple[set[str], set[int]]:
    """Float values computed from integers through ops that read no activation (nodes in topological order), and
    the nodes computing them or reading them into integers (a Cast back to int64, a comparison)."""
    derived: set[str] = set()
    constant = set(g.tensors)  # values computed from constants alone (a reshaped or expanded constant)
    nodes: set[int] = set()
    for index, node in enumerate(g.nodes):
        if node.op_type == "Constant" or node.op_type in _VALUE_FREE_OPS:
            continue
        data = _data_inputs(node)
        if all(name in constant for name in data):
            constant.update(out for out in node.output if out)
            continue
        float_inputs = [name for name in node.input if name and g.is_float(name)]
        if node.op_type in HEAVY_OPS:  # only index values, or an outer product with frequencies: never a weight
            index_only = any(name in derived for name in float_inputs) and all(
                name in derived or (name in constant and (name not in g.tensors or _outer_factor(g, node, name)))
                for name in float_inputs
            )
        elif node.op_type in _TABLE_OPS and data[0] not in derived:
            index_only = False  # an embedding or weight table read at indices: data, not index arithmetic
        else:
            seeded = any(name in derived or (g.is_integer(name) and name not in constant) for name in data)
            index_only = seeded and all(_index_operand(g, name, derived, constant) for name in float_inputs)
        float_outputs = [out for out in node.output if out and g.is_float(out)]
        if index_only and (float_outputs or any(name in derived for name in float_inputs)):
            derived.update(float_outputs)
            nodes.add(index)
    # The constant-only computations feeding those nodes (an expanded inv_freq) keep their values unrounded too.
    pending = [name for i in nodes for name in g.nodes[i].input if name in constant and name in g.producer]
    while pending:
        producer = g.producer[pending.pop()]
        if producer not in nodes and g.nodes[producer].op_type != "Constant":
            nodes.add(producer)
            derived.update(out for out in g.nodes[producer].output if out and g.is_float(out))
            pending.extend(name for name in g.nodes[producer].input if name in constant and name in g.producer)
    return derived, nodes


def _outer_factor(g: _Graph, node: onnx.NodeProto, name: str) -> bool:
    """A MatMul constant whose contracted dimension is 1: ``positions[:, None] @ inv_freq[None, :]`` multiplies
    without summing, like an elementwise Mul (rotary embeddings), and no weight has K = 1."""
    dims = tuple(g.tensors[name].dims)
    if node.op_type != "MatMul" or len(dims) < 2:
        return False
    return dims[-2] == 1 if name == node.input[1] else dims[-1] == 1


def _data_inputs(node: onnx.NodeProto) -> list[str]:
    """The inputs an op reads as values (not its shape, axes or bounds arguments); Range and ConstantOfShape make
    their values from their arguments, and the indices of a Gather or Scatter pick the values it returns."""
    skip = () if node.op_type in _GENERATORS | _INDEXED else SHAPE_INPUTS.get(node.op_type, ())
    return [name for position, name in enumerate(node.input) if name and position not in skip]


def _index_operand(g: _Graph, name: str, derived: set[str], constant: set[str]) -> bool:
    if name in derived or not g.is_float(name):
        return True
    if name in g.tensors:
        return g.constant_fits_half(name)
    return name in constant


def _backward(g: _Graph, derived: set[str]) -> set[int]:
    """Nodes reading or writing floats on the way back from a shape or index input (stopping at heavy ops, at
    ``Shape``/``Size`` and at the index-derived values the forward rule already keeps)."""
    starts = [
        node.input[position]
        for node in g.nodes
        for position in SHAPE_INPUTS.get(node.op_type, ())
        if position < len(node.input) and node.input[position]
    ]
    kept: set[int] = set()
    seen: set[str] = set()
    while starts:
        name = starts.pop()
        if name in seen or name not in g.producer:
            continue
        seen.add(name)
        index = g.producer[name]
        node = g.nodes[index]
        if node.op_type in HEAVY_OPS or node.op_type in _VALUE_FREE_OPS:
            continue
        if any(g.is_float(name) and name not in derived for name in [*node.input, *node.output] if name):
            kept.add(index)
        starts.extend(inp for inp in node.input if inp)
    return kept


def _coordinates(g: _Graph, derived: set[str]) -> set[int]:
    """Nodes that mix index-derived values into activations and whose results reach graph outputs through cheap
    ops only, plus the cheap ops after them on that way."""
    cheap = _cheap_to_outputs(g)
    kept: set[int] = set()
    for index, node in enumerate(g.nodes):
        if index not in cheap or not any(g.is_float(out) and out not in derived for out in node.output if out):
            continue
        if any(name in derived or g.producer.get(name) in kept for name in node.input if name):
            kept.add(index)
    return kept


def _cheap_to_outputs(g: _Graph) -> set[int]:
    """Nodes other than heavy ops whose every used output is a graph output or read only by such nodes."""
    cheap: set[int] = set()
    for index in reversed(range(len(g.nodes))):
        node = g.nodes[index]
        if node.op_type in HEAVY_OPS or node.op_type == "Constant":
            continue
        used = [out for out in node.output if out and (out in g.outputs or g.readers.get(out))]
        if used and all(_reads_only_cheap(g, out, cheap) for out in used):
            cheap.add(index)
    return cheap


def _reads_only_cheap(g: _Graph, name: str, cheap: set[int]) -> bool:
    return all(reader in cheap for reader in g.readers.get(name, ()))
