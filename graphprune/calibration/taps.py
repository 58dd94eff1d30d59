"""Reduction taps: small graph additions that turn each target's activation into Σx² per channel (and XᵀX).

One tap per distinct (activation tensor, channel axis) pair, however many weights read it. Each tap casts to
float32 when needed, reduces every axis but the channel axis with ReduceSumSquare, and is fetched as a graph
output; a ``Size`` output per activation gives the number of rows reduced (size / K). Taps are mapped to targets
through :class:`Tap` records, never by parsing output names.

:func:`tapped` appends the taps to a model for the duration of a ``with`` block and removes them afterwards, so
the caller can serialise the tapped model without first copying every weight.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphprune.graph.targets import Target

# Initializers at most this large keep their values in the weightless copy used for shape inference.
_SMALL_INITIALIZER = 4096


@dataclass(frozen=True)
class Tap:
    """One reduction over one activation tensor, and the weights whose statistics it feeds."""

    activation: str
    axis: int  # channel axis of ``activation`` (negative when the rank is known)
    k: int
    sumsq_output: str  # float32 [K]
    size_output: str  # int64 scalar: number of elements of ``activation``; rows = size / K
    gram_output: str | None  # float32 [K, K], when asked for and possible
    targets: tuple[str, ...]  # one entry per consumer that reads this activation along this axis


@dataclass
class TapPlan:
    """Everything to append to the graph, plus the explicit mapping from outputs to targets."""

    taps: list[Tap]
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    anchors: list[str] = field(default_factory=list)  # per node: the activation it reads, to place it after
    initializers: list[TensorProto] = field(default_factory=list)
    outputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise ValueError("the model imports no default-domain (ai.onnx) opset")


def tensor_types(model: onnx.ModelProto) -> dict[str, tuple[int, int | None]]:
    """Element type and rank (None when unknown) of every tensor that shape inference can tell.

    Inference runs on a weightless copy (large initializers become typed graph inputs), so it costs no
    memory for the weights and works on models loaded without their external data.
    """
    skeleton = onnx.ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    g = skeleton.graph
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    g.value_info.extend(model.graph.value_info)
    declared = {v.name for v in model.graph.input}
    for init in model.graph.initializer:
        if _numel(init) <= _SMALL_INITIALIZER and init.data_location != TensorProto.EXTERNAL:
            g.initializer.append(init)
        elif init.name not in declared:
            g.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False)
    except Exception:  # inference is best effort: unknown ranks use the rank-independent taps
        inferred = skeleton
    types: dict[str, tuple[int, int | None]] = {}
    graph = inferred.graph
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type"):
            types[vi.name] = (tt.elem_type, len(tt.shape.dim) if tt.HasField("shape") else None)
    for init in model.graph.initializer:
        types[init.name] = (init.data_type, len(init.dims))
    return types


def _numel(t: TensorProto) -> int:
    return int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1


class _Builder:
    """Appends nodes with fresh, collision-free names."""

    def __init__(self, model: onnx.ModelProto, plan: TapPlan) -> None:
        self.opset = default_opset(model)
        self.plan = plan
        self.anchor = ""
        g = model.graph
        self.taken = {v.name for v in [*g.input, *g.output, *g.value_info]} | {i.name for i in g.initializer}
        self.taken |= {o for n in g.node for o in n.output} | {n.name for n in g.node}
        self.count = 0

    def fresh(self, hint: str) -> str:
        while True:
            self.count += 1
            name = f"graphprune_tap_{self.count}_{hint}"
            if name not in self.taken:
                self.taken.add(name)
                return name

    def node(self, op: str, inputs: list[str], hint: str, **attrs: object) -> str:
        out = self.fresh(hint)
        self.plan.nodes.append(helper.make_node(op, inputs, [out], name=self.fresh(op), **attrs))
        self.plan.anchors.append(self.anchor)
        return out

    def const(self, values: list[int], hint: str) -> str:
        name = self.fresh(hint)
        self.plan.initializers.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
        return name

    def reduce_sumsq(self, x: str, axes: list[int]) -> str:
        if self.opset >= 18:
            return self.node("ReduceSumSquare", [x, self.const(axes, "axes")], "sumsq", keepdims=0)
        return self.node("ReduceSumSquare", [x], "sumsq", axes=axes, keepdims=0)

    def reduce_sum(self, x: str, axes: list[int]) -> str:
        if self.opset >= 13:
            return self.node("ReduceSum", [x, self.const(axes, "axes")], "sum", keepdims=0)
        return self.node("ReduceSum", [x], "sum", axes=axes, keepdims=0)

    def reshape(self, x: str, shape: list[int]) -> str:
        return self.node("Reshape", [x, self.const(shape, "shape")], "reshaped")

    def output(self, name: str, elem_type: int, shape: list[int]) -> None:
        self.plan.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))


def _sumsq(b: _Builder, x: str, axis: int, rank: int | None, k: int) -> str:
    """Σx² over every axis of ``x`` but ``axis``: float32 [K]."""
    if rank is None:
        if axis >= 0:  # [d0 .. d(a-1), K, rest]: rank a + 2 whatever the input's rank
            return _sumsq(b, b.reshape(x, [0] * axis + [k, -1]), axis, axis + 2, k)
        if axis < -1:  # square and sum the trailing axes first, then sum the rest: K is last
            partial = b.reduce_sumsq(x, list(range(axis + 1, 0)))
            return b.reduce_sum(b.reshape(partial, [-1, k]), [0])
        return b.reduce_sumsq(b.reshape(x, [-1, k]), [0])
    c = axis % rank
    if rank == 1:
        return b.node("Mul", [x, x], "square")
    return b.reduce_sumsq(x, [i for i in range(rank) if i != c])


def _rows(b: _Builder, x: str, axis: int, rank: int | None, k: int) -> str | None:
    """``x`` as a [rows, K] matrix, or None when that needs a rank nobody knows."""
    if rank is None:
        if axis == -1:
            return b.reshape(x, [-1, k])
        if axis >= 0:
            return _rows(b, b.reshape(x, [0] * axis + [k, -1]), axis, axis + 2, k)
        return None
    c = axis % rank
    if c != rank - 1:
        x = b.node("Transpose", [x], "channel_last", perm=[i for i in range(rank) if i != c] + [c])
    return b.reshape(x, [-1, k])


def plan_taps(model: onnx.ModelProto, targets: Sequence[Target], gram: bool = False) -> TapPlan:
    """Decide the taps for ``targets`` and build the nodes and outputs that compute them."""
    types = tensor_types(model)
    g = model.graph
    available = {v.name for v in g.input} | {i.name for i in g.initializer} | {o for n in g.node for o in n.output}
    plan = TapPlan(taps=[])
    groups: dict[tuple[str, int], tuple[int, list[str]]] = {}
    for t in targets:
        for c in t.consumers:
            if c.activation not in available:
                plan.warnings.append(
                    f"weight {t.name}: activation {c.activation!r} of node {c.node} is not a tensor of the main "
                    "graph; its statistics miss that consumer"
                )
                continue
            rank = types.get(c.activation, (0, None))[1]
            axis = c.activation_axis - rank if rank is not None and c.activation_axis >= 0 else c.activation_axis
            groups.setdefault((c.activation, axis), (t.k, []))[1].append(t.name)

    b = _Builder(model, plan)
    as_float: dict[str, str] = {}
    sizes: dict[str, str] = {}
    for (activation, axis), (k, names) in groups.items():
        elem_type, rank = types.get(activation, (TensorProto.UNDEFINED, None))
        b.anchor = activation
        if activation not in as_float:
            x = activation
            if elem_type != TensorProto.FLOAT:  # fp16/bf16 (or unknown): reduce in float32, never overflow
                x = b.node("Cast", [activation], "float32", to=TensorProto.FLOAT)
            as_float[activation] = x
            sizes[activation] = b.node("Size", [x], "size")
            b.output(sizes[activation], TensorProto.INT64, [])
        x = as_float[activation]
        sumsq = _sumsq(b, x, axis, rank, k)
        b.output(sumsq, TensorProto.FLOAT, [k])
        gram_out = None
        if gram:
            rows = _rows(b, x, axis, rank, k)
            if rows is None:
                plan.warnings.append(f"no Gram for {activation!r}: its rank is unknown and K is not its last axis")
            else:
                gram_out = b.node("MatMul", [b.node("Transpose", [rows], "rows_t", perm=[1, 0]), rows], "gram")
                b.output(gram_out, TensorProto.FLOAT, [k, k])
        plan.taps.append(Tap(activation, axis, k, sumsq, sizes[activation], gram_out, tuple(names)))
    return plan


@contextmanager
def tapped(model: onnx.ModelProto, plan: TapPlan) -> Iterator[onnx.ModelProto]:
    """The model with the taps appended, for the duration of the block; restored exactly afterwards.

    The taps go at the end of the node list, those of the *last* activations first. ONNX Runtime's default
    execution order is a depth-first walk back from the leaf nodes, last leaf first: this way the walk starts
    from the tap of the first activation, so every tap runs as soon as its activation exists and the
    activation is freed as early as in a plain run. (Appended in graph order, or next to their producers,
    the taps would all run after the model's own outputs, keeping every tapped activation alive until then.)
    """
    g = model.graph
    n_nodes, n_inits, n_outputs = len(g.node), len(g.initializer), len(g.output)
    producer = {out: i for i, n in enumerate(g.node) for out in n.output}
    order = sorted(range(len(plan.nodes)), key=lambda j: -producer.get(plan.anchors[j], -1))
    g.node.extend(plan.nodes[j] for j in order)
    g.initializer.extend(plan.initializers)
    g.output.extend(plan.outputs)
    try:
        yield model
    finally:
        del g.node[n_nodes:]
        del g.initializer[n_inits:]
        del g.output[n_outputs:]
