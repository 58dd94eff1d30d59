"""Reduction taps: small graph additions that turn each target's activation into Σx² per channel (and XᵀX).

One tap per distinct (activation tensor, channel axis) pair, however many weights read it. Each tap casts to
float32 when needed, reduces every axis but the channel axis with ReduceSumSquare, and is fetched as a graph
output; a ``Size`` output per activation gives the number of rows reduced (size / K). Taps are mapped to targets
through :class:`Tap` records, never by parsing output names.

The tap nodes read the model's own values. :func:`plan_taps` is a context manager: inside the block the taps are
connected to the model (so :mod:`graphprune.calibration.session` can cut the graph at them), and on leaving it
they are disconnected again, leaving the model as it was.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from graphprune.calibration.gram_taps import ALL_ROWS, GramSampling, GramTap, gram_tap
from graphprune.calibration.session import (
    SessionModel,
    cut,
    outer_reads,
    session_model,
    values_by_name,
)
from graphprune.graph.targets import Target
from graphprune.graph.types import value_types


@dataclass(frozen=True, kw_only=True)
class Tap:
    """One reduction over one activation tensor, and the weights whose statistics it feeds."""

    activation: str
    axis: int  # channel axis of ``activation`` (negative when the rank is known)
    k: int
    sumsq_output: str  # float32 [K]
    size_output: str  # int64 scalar: number of elements of ``activation``; rows = size / K
    gram: GramTap | None  # Σ x xᵀ [K, K] (and its rows' Σx and count where sampled), when asked for and possible
    targets: tuple[str, ...]  # one entry per consumer that reads this activation along this axis
    sum_output: str | None = None  # float32 [K]: Σx per channel, when asked for (the refit's bias needs E[x])


@dataclass(kw_only=True)
class TapPlan:
    """The tap nodes (connected to the model's values), their outputs, and the mapping from outputs to targets."""

    taps: list[Tap]
    nodes: list[ir.Node] = field(default_factory=list)
    anchors: list[ir.Value] = field(default_factory=list)  # per node: the activation it reduces
    constants: list[ir.Value] = field(default_factory=list)  # axes and shapes the taps read
    outputs: list[ir.Value] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def output_names(self) -> list[str]:
        return [str(o.name) for o in self.outputs]


def default_opset(model: ir.Model) -> int:
    for domain in ("", "ai.onnx"):
        if domain in model.opset_imports:
            return model.opset_imports[domain]
    raise ValueError("the model imports no default-domain (ai.onnx) opset")


class TapBuilder:
    """Creates tap nodes with fresh names: none a tensor of ``values`` or a node anywhere in the model has."""

    def __init__(self, model: ir.Model, values: Iterable[str], plan: TapPlan) -> None:
        self.opset = default_opset(model)
        self.plan = plan
        self.anchor: ir.Value | None = None
        self.taken = set(values) | {str(n.name) for n in model.graph.all_nodes() if n.name}
        self.count = 0

    def fresh(self, hint: str) -> str:
        while True:
            self.count += 1
            name = f"graphprune_tap_{self.count}_{hint}"
            if name not in self.taken:
                self.taken.add(name)
                return name

    def node(self, op: str, inputs: list[ir.Value], hint: str, **attrs: int | list[int]) -> ir.Value:
        out = ir.Value(name=self.fresh(hint))
        attributes = [ir.AttrInt64s(k, v) if isinstance(v, list) else ir.AttrInt64(k, v) for k, v in attrs.items()]
        self.plan.nodes.append(ir.Node("", op, inputs, attributes, outputs=[out], name=self.fresh(op)))
        assert self.anchor is not None
        self.plan.anchors.append(self.anchor)
        return out

    def const(self, values: list[int], hint: str) -> ir.Value:
        return self.array(np.array(values, dtype=np.int64), hint)

    def array(self, array: np.ndarray, hint: str, dtype: ir.DataType | None = None) -> ir.Value:
        """A constant the taps read; ``dtype`` where numpy's type does not name it (e.g. float8 codes)."""
        name = self.fresh(hint)
        tensor = ir.Tensor(np.ascontiguousarray(array), dtype=dtype, name=name)
        value = ir.Value(name=name, const_value=tensor, type=ir.TensorType(tensor.dtype))
        value.shape = ir.Shape(array.shape)
        self.plan.constants.append(value)
        return value

    def reduce_sumsq(self, x: ir.Value, axes: list[int]) -> ir.Value:
        if self.opset >= 18:
            return self.node("ReduceSumSquare", [x, self.const(axes, "axes")], "sumsq", keepdims=0)
        return self.node("ReduceSumSquare", [x], "sumsq", axes=axes, keepdims=0)

    def reduce_sum(self, x: ir.Value, axes: list[int]) -> ir.Value:
        if self.opset >= 13:
            return self.node("ReduceSum", [x, self.const(axes, "axes")], "sum", keepdims=0)
        return self.node("ReduceSum", [x], "sum", axes=axes, keepdims=0)

    def reshape(self, x: ir.Value, shape: list[int]) -> ir.Value:
        return self.node("Reshape", [x, self.const(shape, "shape")], "reshaped")

    def output(self, value: ir.Value, dtype: ir.DataType, shape: list[int]) -> None:
        value.dtype, value.shape = dtype, ir.Shape(shape)
        self.plan.outputs.append(value)


def _sumsq(b: TapBuilder, x: ir.Value, axis: int, rank: int | None, k: int) -> ir.Value:
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


def as_rows(b: TapBuilder, x: ir.Value, axis: int, rank: int | None, k: int) -> ir.Value | None:
    """``x`` as a [rows, K] matrix, or None when that needs a rank nobody knows."""
    if rank is None:
        if axis == -1:
            return b.reshape(x, [-1, k])
        if axis >= 0:
            return as_rows(b, b.reshape(x, [0] * axis + [k, -1]), axis, axis + 2, k)
        return None
    c = axis % rank
    if c != rank - 1:
        x = b.node("Transpose", [x], "channel_last", perm=[i for i in range(rank) if i != c] + [c])
    return b.reshape(x, [-1, k])


@contextmanager
def plan_taps(
    model: ir.Model,
    targets: Sequence[Target],
    gram: bool = False,
    types: Mapping[str, tuple[int, int | None]] | None = None,
    sums: bool = False,
    sampling: GramSampling = ALL_ROWS,
) -> Iterator[TapPlan]:
    """The taps for ``targets``, connected to the model's values for the duration of the block.

    ``types`` is :func:`value_types` of the model when the caller has it (sequential calibration plans many);
    ``sums`` adds Σx per channel (with ``gram``, the refit of ``shrink`` solves the bias from it); ``sampling``:
    the rows of the Gram matrices (``shrink``'s options; every row for ``apply``).
    """
    graph = model.graph
    values = values_by_name(graph)
    types = value_types(model) if types is None else types
    plan = TapPlan(taps=[])
    groups: dict[tuple[str, int], tuple[int, list[str]]] = {}
    for t in targets:
        for c in t.consumers:
            if c.activation not in values:
                plan.warnings.append(
                    f"weight {t.name}: activation {c.activation!r} of node {c.node} is not a tensor of the main "
                    "graph; its statistics miss that consumer"
                )
                continue
            rank = types.get(c.activation, (0, None))[1]
            axis = c.activation_axis - rank if rank is not None and c.activation_axis >= 0 else c.activation_axis
            groups.setdefault((c.activation, axis), (t.k, []))[1].append(t.name)

    b = TapBuilder(model, values, plan)
    as_float: dict[str, ir.Value] = {}
    sizes: dict[str, ir.Value] = {}
    try:
        for (activation, axis), (k, names) in groups.items():
            elem_type, rank = types.get(activation, (onnx.TensorProto.UNDEFINED, None))
            b.anchor = values[activation]
            if activation not in as_float:
                x = values[activation]
                if (
                    elem_type != onnx.TensorProto.FLOAT
                ):  # fp16/bf16 (or unknown): reduce in float32, never overflow
                    x = b.node("Cast", [x], "float32", to=onnx.TensorProto.FLOAT)
                as_float[activation] = x
                sizes[activation] = b.node("Size", [x], "size")
                b.output(sizes[activation], ir.DataType.INT64, [])
            x = as_float[activation]
            sumsq = _sumsq(b, x, axis, rank, k)
            b.output(sumsq, ir.DataType.FLOAT, [k])
            rows = as_rows(b, x, axis, rank, k) if gram or sums else None
            sum_out, gram_out = None, None
            if sums and rows is not None:
                sum_out = b.reduce_sum(rows, [0])
                b.output(sum_out, ir.DataType.FLOAT, [k])
            if gram:
                if rows is None:
                    plan.warnings.append(
                        f"no Gram for {activation!r}: its rank is unknown and K is not its last axis"
                    )
                else:
                    gram_out = gram_tap(b, model, values[activation], rows, axis, k, sampling)
            plan.taps.append(
                Tap(
                    activation=activation,
                    axis=axis,
                    k=k,
                    sumsq_output=str(sumsq.name),
                    size_output=str(sizes[activation].name),
                    gram=gram_out,
                    targets=tuple(names),
                    sum_output=_name(sum_out),
                )
            )
        yield plan
    finally:
        for node in plan.nodes:  # the model's values forget their tap uses
            node.resize_inputs(0)


@contextmanager
def connected(plan: TapPlan) -> Iterator[TapPlan]:
    """Inside the block ``plan``'s tap nodes read the model's values; on leaving it the values forget those uses,
    leaving the model as it was (for tap builders other than :func:`plan_taps`)."""
    try:
        yield plan
    finally:
        for node in plan.nodes:
            node.resize_inputs(0)


def _name(value: ir.Value | None) -> str | None:
    return None if value is None else str(value.name)


def tapped_model(
    model: ir.Model,
    plan: TapPlan,
    keep: Sequence[ir.Value] = (),
    available: Mapping[ir.Value, ir.Value] | None = None,
) -> SessionModel:
    """The model cut at its last tapped tensor, with the taps as its outputs (and ``keep``, for sequential).

    Only the nodes the taps (and ``keep``) depend on are kept: outputs, heads and everything downstream of every
    tap are left out. They start from the graph's inputs, or from ``available`` (values computed earlier, each
    with the typed input that carries it). The taps come last, those of the *last* activations first: ONNX
    Runtime's default execution order is a depth-first walk back from the leaf nodes, last leaf first, so this
    way every tap runs as soon as its activation exists and the activation is freed as early as in a plain run.
    """
    graph = model.graph
    wanted = [v for node in plan.nodes for v in node.inputs if v is not None and v.producer() not in plan.nodes]
    nodes = cut(graph, [*wanted, *keep], available or ())
    if available is None:
        inputs = list(graph.inputs)
    else:
        read = {v for n in nodes for v in outer_reads(n)} | set(wanted) | set(keep)
        inputs = [carrier for value, carrier in available.items() if value in read]
    position = {node: i for i, node in enumerate(nodes)}
    order = sorted(range(len(plan.nodes)), key=lambda j: -position.get(plan.anchors[j].producer(), -1))  # type: ignore[arg-type]  # a node or None, both valid keys of .get
    taps = [plan.nodes[j] for j in order]
    return session_model(model, [*nodes, *taps], inputs, [*plan.outputs, *keep], plan.constants)
