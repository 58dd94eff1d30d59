"""Find the weights that feed matrix multiplications, with their reduction axis K, or say why not.

A *target* is a stored tensor (an initializer or the value of a Constant node) that reaches the weight operand
of MatMul, Gemm or Conv(group=1), possibly through Identity, Transpose, Cast or DequantizeLinear. Everything
that looks like a weight but cannot be pruned safely becomes a :class:`Skip` with a reason.

The graph is an onnx-ir model: every value knows its producer and its uses, including the reads of nodes inside
If/Loop/Scan bodies (a subgraph refers to the outer value itself), so no index of our own is built.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Protocol

import onnx_ir as ir

from graphprune.graph.stored import stored_dtype, stored_shape, stored_values


@dataclass(frozen=True, kw_only=True)
class Consumer:
    """One node that multiplies by the weight."""

    node: str  # node label (see :func:`node_labels`; "outer/attribute/inner" inside a subgraph)
    op: str  # "MatMul" | "Gemm" | "Conv"
    input_index: int  # which input of the node receives the (transformed) weight
    activation: str  # tensor multiplied by the weight: its channel axis runs along K
    activation_axis: int  # axis of ``activation`` that is K (negative counts from the end)
    output: str  # the node's first output
    in_subgraph: bool = False  # the node is inside an If/Loop/Scan body, where calibration cannot tap


@dataclass(frozen=True, kw_only=True)
class Target:
    """A prunable weight: where it is stored and how its consumers see it."""

    name: str  # stored tensor name: an initializer or a Constant node's output
    op: str  # op of the first consumer
    shape: tuple[int, ...]  # stored shape
    dtype: str  # stored dtype, numpy name ("float32", "float16", "bfloat16", "int8"/"int4"... under DQ)
    k_axis: int  # reduction axis K, in the stored tensor's coordinates (non-negative)
    out_axis: int  # output-neuron axis, in the stored tensor's coordinates (non-negative)
    consumers: tuple[Consumer, ...]
    through: tuple[str, ...] = ()  # ops looked through between storage and (the first) consumer, storage first
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


@dataclass
class TargetScan:
    """What :func:`find_targets` found: prunable targets and weight-like tensors left alone."""

    targets: list[Target]
    skips: list[Skip]


# Ops between a stored tensor and its consumer that keep every value where it is (up to a permutation).
LOOK_THROUGH = frozenset({"Identity", "Transpose", "Cast", "DequantizeLinear"})
# Ops that multiply by a weight but that graphprune does not prune: their weights are reported, not touched.
UNHANDLED_MATMUL_OPS = frozenset(
    {"ConvTranspose", "Einsum", "MatMulInteger", "QLinearMatMul", "QLinearConv", "ConvInteger", "FusedMatMul"}
)
FLOAT_DTYPES = frozenset({"float32", "float16", "bfloat16", "float64"})
# Graph outputs that only carry a key/value cache forward (Hugging Face / Optimum "present.N.key", genai
# "present_key_values"): a K/V projection's route to one of them says nothing about it being a head.
CACHE_OUTPUT_PREFIXES = ("present",)


class _Named(Protocol):
    @property
    def name(self) -> str | None: ...

    @property
    def op_type(self) -> str: ...


def node_labels(nodes: Iterable[_Named]) -> list[str]:
    """A unique label per node, in order: its name, or ``<op>_<index>`` when it has none or repeats one.

    Works on onnx-ir nodes and on ``onnx.NodeProto`` alike, so a label names the same node in both.
    """
    labels: list[str] = []
    seen: set[str] = set()
    for index, node in enumerate(nodes):
        label = node.name or f"{node.op_type}_{index}"
        while label in seen:
            label = f"{label}_{index}"
        seen.add(label)
        labels.append(label)
    return labels


@dataclass(frozen=True)
class _Use:
    """Where a stored tensor ends up after the look-through ops: a consumer's input, or a graph output."""

    node: ir.Node | None  # None: the tensor is a graph output
    input_index: int
    perm: tuple[int, ...]  # consumer-view axis a is stored axis perm[a]
    through: tuple[str, ...]


class _Graph:
    """Node labels (main graph and subgraphs) and a memo of which values are computed from constants alone."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.stored = stored_values(graph)
        self.labels: dict[int, str] = {}
        self._label_nodes(graph, "")
        self._constant: dict[int, bool] = {}

    def _label_nodes(self, graph: ir.Graph, prefix: str) -> None:
        nodes = list(graph)
        for node, label in zip(nodes, node_labels(nodes), strict=True):
            self.labels[id(node)] = prefix + label
            for attr in node.attributes.values():
                for sub in _subgraphs(attr):
                    self._label_nodes(sub, f"{prefix}{label}/{attr.name}/")

    def label(self, node: ir.Node) -> str:
        return self.labels[id(node)]

    def in_main(self, node: ir.Node) -> bool:
        return node.graph is self.graph

    def is_constant(self, value: ir.Value) -> bool:
        """True when ``value`` is computed from constants alone (an initializer, a Constant, or a fold of them)."""
        if id(value) not in self._constant:
            # Iterative post-order walk with a memo: graphs are deep, and ancestors are shared.
            stack = [value]
            while stack:
                current = stack[-1]
                if id(current) in self._constant:
                    stack.pop()
                    continue
                node = current.producer()
                if current.is_graph_input() or node is None:
                    self._constant[id(current)] = not current.is_graph_input() and (
                        current.is_initializer() or current.const_value is not None
                    )
                    stack.pop()
                    continue
                if node.op_type == "Constant":
                    self._constant[id(current)] = True
                    stack.pop()
                    continue
                pending = [i for i in node.inputs if i is not None and id(i) not in self._constant]
                if pending:
                    stack.extend(pending)
                    continue
                self._constant[id(current)] = all(self._constant[id(i)] for i in node.inputs if i is not None)
                stack.pop()
        return self._constant[id(value)]

    def final_uses(self, value: ir.Value, perm: tuple[int, ...], through: tuple[str, ...] = ()) -> list[_Use]:
        """Follow ``value`` through look-through ops to the nodes (or graph outputs) that really use it."""
        found: list[_Use] = []
        if value.is_graph_output():
            found.append(_Use(None, 0, perm, through))
        for node, index in value.uses():
            if node.op_type in LOOK_THROUGH and index == 0:
                found.extend(self.final_uses(node.outputs[0], _follow(node, perm), (*through, node.op_type)))
            else:
                found.append(_Use(node, index, perm, through))
        return found


def _subgraphs(attr: ir.Attr) -> Iterator[ir.Graph]:
    if attr.is_ref():
        return
    if attr.type == ir.AttributeType.GRAPH:
        yield attr.as_graph()
    elif attr.type == ir.AttributeType.GRAPHS:
        yield from attr.as_graphs()


def find_targets(model: ir.Model, include_head: bool = True) -> TargetScan:
    """Every prunable weight of the main graph, with its K axis; everything weight-like that isn't, as a Skip.

    With ``include_head=False`` the final projection to a model output is reported as a Skip instead.
    """
    graph = _Graph(model.graph)
    targets: list[Target] = []
    skips: list[Skip] = []
    for name, value in graph.stored.items():
        outcome = _classify(graph, name, value)
        if isinstance(outcome, Target):
            targets.append(outcome)
        elif outcome is not None:
            skips.append(outcome)
    skips.extend(_weights_from_inputs_or_folds(graph))
    heads = _head_consumers(graph, targets)
    flagged = [replace(t, is_head=any(c.node in heads for c in t.consumers)) for t in targets]
    if include_head:
        return TargetScan(flagged, skips)
    kept = [t for t in flagged if not t.is_head]
    skipped_heads = [
        Skip(t.name, t.op, "output head (the final projection to a model output), left dense; `include_head=True`")
        for t in flagged
        if t.is_head
    ]
    return TargetScan(kept, skips + skipped_heads)


def _follow(node: ir.Node, perm: tuple[int, ...]) -> tuple[int, ...]:
    if node.op_type != "Transpose":
        return perm
    order = node.attributes.get_ints("perm")
    if order is None:
        order = list(range(len(perm)))[::-1]
    return tuple(perm[p] for p in order)


def _consumer_axes(graph: _Graph, node: ir.Node, index: int, rank: int) -> tuple[int, int, ir.Value, int] | str:
    """(K axis, out axis, activation, activation axis) in the consumer's view of the weight, or why not."""
    op = node.op_type
    if op == "MatMul":
        other = node.inputs[1 - index]
        assert other is not None
        if graph.is_constant(other):
            return "both MatMul operands are constant (fold the graph first)"
        if rank < 2:
            return "1-D MatMul operand (a vector, not a matrix)"
        if index == 1:  # Y = A @ W, W [..., K, N]
            return rank - 2, rank - 1, other, -1
        return rank - 1, rank - 2, other, -2  # Y = W @ B, W [..., M, K]
    if op == "Gemm":
        if index == 2:
            return "Gemm bias (input C) is not a matrix weight"
        trans_a, trans_b = node.attributes.get_int("transA", 0), node.attributes.get_int("transB", 0)
        other = node.inputs[1 - index]
        assert other is not None
        if graph.is_constant(other):
            return "both Gemm operands are constant (fold the graph first)"
        if index == 1:  # B is [K, N], or [N, K] with transB
            return (1, 0, other, 0 if trans_a else 1) if trans_b else (0, 1, other, 0 if trans_a else 1)
        # A is [M, K], or [K, M] with transA; the activation B is [K, N], or [N, K] with transB
        return (0, 1, other, 1 if trans_b else 0) if trans_a else (1, 0, other, 1 if trans_b else 0)
    if op == "Conv":
        if index != 1:
            return "Conv bias is not a matrix weight" if index == 2 else "Conv input is a constant"
        group = node.attributes.get_int("group", 1)
        if group != 1:
            return f"grouped or depthwise Conv (group={group}) is not handled"
        activation = node.inputs[0]
        assert activation is not None
        return 1, 0, activation, 1
    return f"op {op} is not handled"


def _classify(graph: _Graph, name: str, value: ir.Value) -> Target | Skip | None:
    """A Target, a Skip with the reason, or None when the tensor never reaches a matrix multiplication."""
    shape = stored_shape(value)
    rank = len(shape)
    uses = graph.final_uses(value, tuple(range(rank)))
    multiplies = [u for u in uses if u.node is not None and _is_matmul_like(u.node)]
    if not multiplies:
        return None
    first_op = multiplies[0].node.op_type  # type: ignore[union-attr]  # u.node checked not None above
    if value.is_graph_input():
        return Skip(name, first_op, "initializer is also a graph input: a caller may override it at run time")
    others = [u for u in uses if u not in multiplies]
    if others:
        what = ", ".join(sorted({u.node.op_type if u.node else "graph output" for u in others}))
        inside = any(u.node is not None and not graph.in_main(u.node) for u in others)
        where = " inside a subgraph (If/Loop/Scan body)" if inside else ""
        return Skip(name, first_op, f"also used by {what}{where}, which would see the pruned values")
    if 0 in shape:
        return Skip(name, first_op, f"empty weight (shape {list(shape)}): nothing to prune")
    dtype = stored_dtype(value)
    quantized = any("DequantizeLinear" in u.through for u in multiplies)
    if quantized and not all(u.through[:1] == ("DequantizeLinear",) for u in multiplies):
        return Skip(name, first_op, "DequantizeLinear after other ops is not handled")
    if dtype not in FLOAT_DTYPES and not quantized:
        return Skip(name, first_op, f"integer weight ({dtype}) outside DequantizeLinear")
    consumers: list[Consumer] = []
    axes: set[tuple[int, int]] = set()
    for use in multiplies:
        node = use.node
        assert node is not None
        found = _consumer_axes(graph, node, use.input_index, rank)
        if isinstance(found, str):
            return Skip(name, node.op_type, found)
        k_view, out_view, activation, activation_axis = found
        axes.add((use.perm[k_view], use.perm[out_view]))
        output = node.outputs[0].name or ""
        consumers.append(
            Consumer(
                node=graph.label(node),
                op=node.op_type,
                input_index=use.input_index,
                activation=activation.name or "",
                activation_axis=activation_axis,
                output=output,
                in_subgraph=not graph.in_main(node),
            )
        )
    if len(axes) > 1:
        return Skip(name, first_op, f"consumers disagree on the K axis of the shared weight: {sorted(axes)}")
    # Consumers that agree on K are one target, whatever value-preserving ops (Identity, Transpose, Cast) each
    # sees the weight through: the pruned zeros reach every one of them at the same stored positions.
    ((k_axis, out_axis),) = axes
    return Target(
        name=name,
        op=first_op,
        shape=shape,
        dtype=dtype,
        k_axis=k_axis,
        out_axis=out_axis,
        consumers=tuple(consumers),
        through=multiplies[0].through,
    )


def _is_matmul_like(node: ir.Node) -> bool:
    return node.op_type in ("MatMul", "Gemm", "Conv") or node.op_type in UNHANDLED_MATMUL_OPS


def _weights_from_inputs_or_folds(graph: _Graph) -> list[Skip]:
    """Weight operands that are not stored tensors: a graph input, or a value computed from constants."""
    skips: list[Skip] = []
    for node in ir.traversal.RecursiveGraphIterator(graph.graph):
        if node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        source = _trace_back(node.inputs[1])
        if source.name in graph.stored and graph.stored[source.name] is source:
            continue
        label = f"{graph.label(node)}:input1"
        if source.is_graph_input() and source.graph is graph.graph:
            skips.append(
                Skip(source.name or "", node.op_type, f"weight of {label} is a graph input, not a constant")
            )
        elif graph.is_constant(source) and source.producer() is not None:
            op = source.producer().op_type  # type: ignore[union-attr]  # producer() checked not None on the line above
            skips.append(
                Skip(
                    source.name or "",
                    node.op_type,
                    f"weight of {label} is computed from constants by {op}; fold first",
                )
            )
    return skips


def _trace_back(value: ir.Value) -> ir.Value:
    """The stored tensor, graph input or computed value that ``value`` comes from through look-through ops."""
    while not value.is_initializer() and not value.is_graph_input():
        node = value.producer()
        if node is None or node.op_type not in LOOK_THROUGH or node.inputs[0] is None:
            break
        value = node.inputs[0]
    return value


def _head_consumers(graph: _Graph, targets: list[Target]) -> set[str]:
    """Consumer nodes that alone stand between the rest of the model and some graph output.

    Walking back from each graph output, stop at every matrix multiplication by a weight: if exactly one is met,
    it is that output's head (an LM or classifier projection). A residual path to another weight means no head.
    Key/value cache outputs (``present.*``) are not walked from: the K/V projections feeding them are no heads.
    Run-time quantization scales are not walked (they read the previous layer's output beside the data).
    A control-flow node's walk continues into the outer values its bodies read.
    """
    weight_nodes = {c.node for t in targets for c in t.consumers}
    heads: set[str] = set()
    for output in graph.graph.outputs:
        if (output.name or "").startswith(CACHE_OUTPUT_PREFIXES):
            continue
        met: set[str] = set()
        stack, seen = [output], set()
        while stack:
            value = stack.pop()
            node = value.producer()
            if node is None or id(node) in seen or _is_runtime_scale(node, value):
                continue
            seen.add(id(node))
            label = graph.label(node)
            if label in weight_nodes:
                met.add(label)
                continue
            stack.extend(i for i in node.inputs if i is not None)
            stack.extend(_outer_reads(node))
        if len(met) == 1:
            heads |= met
    return heads


def _is_runtime_scale(node: ir.Node, value: ir.Value) -> bool:
    """The scale or zero point DynamicQuantizeLinear computes: a side path, not the data an output comes from."""
    return node.op_type == "DynamicQuantizeLinear" and value is not node.outputs[0]


def _outer_reads(node: ir.Node) -> list[ir.Value]:
    """Values of enclosing graphs that the bodies of a control-flow node read."""
    bodies = [g for attr in node.attributes.values() for g in _subgraphs(attr)]
    nested = list(bodies)
    for body in bodies:
        nested += [
            g
            for inner in ir.traversal.RecursiveGraphIterator(body)
            for a in inner.attributes.values()
            for g in _subgraphs(a)
        ]
    inside = {id(g) for g in nested}
    reads: list[ir.Value] = []
    for body in nested:
        values = [v for inner in body for v in inner.inputs if v is not None] + list(body.outputs)
        reads += [v for v in values if id(_owner(v)) not in inside]
    return reads


def _owner(value: ir.Value) -> ir.Graph | None:
    node = value.producer()
    return node.graph if node is not None else value.graph


# ONNX Runtime's quantized operators and the input that holds their weight.
QUANTIZED_WEIGHT_INPUT = {
    "MatMulInteger": 1,
    "QLinearMatMul": 3,
    "MatMulNBits": 1,
    "ConvInteger": 1,
    "QLinearConv": 3,
}
# The matrix multiplications among them: the weights :func:`operator_targets` reads for checking.
QUANTIZED_OPERATORS = {op: index for op, index in QUANTIZED_WEIGHT_INPUT.items() if "Conv" not in op}


def operator_targets(model: ir.Model, include_head: bool = False) -> TargetScan:
    """Weights held by ONNX Runtime's quantized operators (MatMulInteger, QLinearMatMul, MatMulNBits), as
    ONNX Runtime's quantizers write them: for checking, never for pruning.

    MatMulInteger and QLinearMatMul store ``[K, N]``; MatMulNBits stores packed ``[N, blocks, bytes]`` blocks, so
    its target's shape is the logical ``(N, K)`` (K on axis 1). The head is found as :func:`find_targets` does.
    """
    graph = _Graph(model.graph)
    targets: list[Target] = []
    skips: list[Skip] = []
    for node in model.graph:
        index = QUANTIZED_OPERATORS.get(node.op_type)
        if index is None or len(node.inputs) <= index or node.inputs[index] is None:
            continue
        weight = node.inputs[index]
        assert weight is not None
        if graph.stored.get(weight.name or "") is not weight:
            skips.append(Skip(weight.name or "", node.op_type, "weight is not a stored tensor"))
            continue
        activation = node.inputs[0]
        consumer = Consumer(
            node=graph.label(node),
            op=node.op_type,
            input_index=index,
            activation=activation.name or "" if activation else "",
            activation_axis=-1,
            output=node.outputs[0].name or "",
        )
        if node.op_type == "MatMulNBits":
            n, k = node.attributes.get_int("N", 0), node.attributes.get_int("K", 0)
            targets.append(
                Target(
                    name=weight.name or "",
                    op=node.op_type,
                    shape=(n, k),
                    dtype="uint4",
                    k_axis=1,
                    out_axis=0,
                    consumers=(consumer,),
                )
            )
        else:
            shape = stored_shape(weight)
            if len(shape) != 2:
                skips.append(Skip(weight.name or "", node.op_type, f"weight of rank {len(shape)}"))
                continue
            targets.append(
                Target(
                    name=weight.name or "",
                    op=node.op_type,
                    shape=shape,
                    dtype=stored_dtype(weight),
                    k_axis=0,
                    out_axis=1,
                    consumers=(consumer,),
                )
            )
    heads = _head_consumers(graph, targets)
    flagged = [replace(t, is_head=any(c.node in heads for c in t.consumers)) for t in targets]
    if include_head:
        return TargetScan(flagged, skips)
    kept = [t for t in flagged if not t.is_head]
    skips += [
        Skip(t.name, t.op, "output head is left out unless the head is included") for t in flagged if t.is_head
    ]
    return TargetScan(kept, skips)
