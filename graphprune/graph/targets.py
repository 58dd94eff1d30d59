"""Find the weights that feed matrix multiplications, with their reduction axis K, or say why not.

A *target* is a stored tensor (an initializer or the value of a Constant node) that reaches the weight operand
of MatMul, Gemm or Conv(group=1), possibly through Identity, Transpose, Cast or DequantizeLinear. Everything
that looks like a weight but cannot be pruned safely becomes a :class:`Skip` with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import onnx


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


# Ops between a stored tensor and its consumer that keep every value where it is (up to a permutation).
LOOK_THROUGH = frozenset({"Identity", "Transpose", "Cast", "DequantizeLinear"})
# Ops that multiply by a weight but that graphprune does not prune: their weights are reported, not touched.
UNHANDLED_MATMUL_OPS = frozenset(
    {"ConvTranspose", "Einsum", "MatMulInteger", "QLinearMatMul", "QLinearConv", "ConvInteger", "FusedMatMul"}
)
FLOAT_DTYPES = frozenset({"float32", "float16", "bfloat16", "float64"})


@dataclass(frozen=True)
class _Use:
    """Where a stored tensor ends up after the look-through ops: a consumer's input, or another use."""

    node: onnx.NodeProto | None  # None: the tensor is a graph output
    label: str
    input_index: int
    perm: tuple[int, ...]  # consumer-view axis a is stored axis perm[a]
    through: tuple[str, ...]


@dataclass
class TargetScan:
    """What :func:`find_targets` found: prunable targets and weight-like tensors left alone."""

    targets: list[Target]
    skips: list[Skip]


def find_targets(model: onnx.ModelProto, include_head: bool = True) -> TargetScan:
    """Every prunable weight of the main graph, with its K axis; everything weight-like that isn't, as a Skip.

    With ``include_head=False`` the final projection to a model output is reported as a Skip instead.
    """
    graph = _GraphIndex(model.graph)
    targets: list[Target] = []
    skips: list[Skip] = []
    for name in graph.stored_names():
        outcome = _classify(graph, name)
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
        Skip(t.name, t.op, "output head (the final projection to a model output) is left dense; --include-head")
        for t in flagged
        if t.is_head
    ]
    return TargetScan(kept, skips + skipped_heads)


class _GraphIndex:
    """Producers, uses and constants of a graph, with a unique label for every node."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.inputs = {i.name for i in graph.input}
        self.outputs = {o.name for o in graph.output}
        self.constants: dict[str, onnx.TensorProto] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        self.labels: dict[int, str] = {}
        self._constant: dict[str, bool] = {}
        seen: set[str] = set()
        for index, node in enumerate(graph.node):
            label = node.name or f"{node.op_type}_{index}"
            while label in seen:
                label = f"{label}_{index}"
            seen.add(label)
            self.labels[id(node)] = label
            for out in node.output:
                self.producer[out] = node
            for i, name in enumerate(node.input):
                if name:
                    self.uses.setdefault(name, []).append((node, i))
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = node.attribute[0].t

    def label(self, node: onnx.NodeProto) -> str:
        return self.labels[id(node)]

    def stored_names(self) -> list[str]:
        return [*self.initializers, *self.constants]

    def stored(self, name: str) -> onnx.TensorProto:
        return self.initializers.get(name) or self.constants[name]

    def is_constant(self, name: str) -> bool:
        """True when ``name`` is computed from constants alone (an initializer, a Constant, or a fold of them)."""
        if name not in self._constant:
            # Iterative post-order walk with a memo: graphs are deep, and ancestors are shared.
            stack = [name]
            while stack:
                current = stack[-1]
                if current in self._constant:
                    stack.pop()
                    continue
                node = self.producer.get(current)
                if current in self.inputs or (node is None and current not in self.initializers):
                    self._constant[current] = current in self.constants
                    stack.pop()
                    continue
                if node is None:
                    self._constant[current] = True
                    stack.pop()
                    continue
                pending = [i for i in node.input if i and i not in self._constant]
                if pending:
                    stack.extend(pending)
                    continue
                self._constant[current] = all(self._constant[i] for i in node.input if i)
                stack.pop()
        return self._constant[name]

    def final_uses(self, name: str, perm: tuple[int, ...], through: tuple[str, ...] = ()) -> list[_Use]:
        """Follow ``name`` through look-through ops to the nodes (or graph outputs) that really use it."""
        found: list[_Use] = []
        if name in self.outputs:
            found.append(_Use(None, "graph output", 0, perm, through))
        for node, index in self.uses.get(name, []):
            if node.op_type in LOOK_THROUGH and index == 0:
                found.extend(self.final_uses(node.output[0], _follow(node, perm), (*through, node.op_type)))
            else:
                found.append(_Use(node, self.label(node), index, perm, through))
        return found


def node_labels(graph: onnx.GraphProto) -> list[str]:
    """The unique label of every node, in graph order: the names :class:`Consumer` records use."""
    index = _GraphIndex(graph)
    return [index.label(node) for node in graph.node]


def _follow(node: onnx.NodeProto, perm: tuple[int, ...]) -> tuple[int, ...]:
    if node.op_type != "Transpose":
        return perm
    order = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
    if order is None:
        order = list(range(len(perm)))[::-1]
    return tuple(perm[p] for p in order)


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _consumer_axes(
    graph: _GraphIndex, node: onnx.NodeProto, index: int, rank: int
) -> tuple[int, int, str, int] | str:
    """(K axis, out axis, activation, activation axis) in the consumer's view of the weight, or why not."""
    op = node.op_type
    if op == "MatMul":
        other = node.input[1 - index]
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
        trans_a, trans_b = _attr(node, "transA", 0), _attr(node, "transB", 0)
        other = node.input[1 - index]
        if graph.is_constant(other):
            return "both Gemm operands are constant (fold the graph first)"
        if index == 1:  # B is [K, N], or [N, K] with transB
            return (1, 0, other, 0 if trans_a else 1) if trans_b else (0, 1, other, 0 if trans_a else 1)
        # A is [M, K], or [K, M] with transA; the activation B is [K, N], or [N, K] with transB
        return (0, 1, other, 1 if trans_b else 0) if trans_a else (1, 0, other, 1 if trans_b else 0)
    if op == "Conv":
        if index != 1:
            return "Conv bias is not a matrix weight" if index == 2 else "Conv input is a constant"
        group = _attr(node, "group", 1)
        if group != 1:
            return f"grouped or depthwise Conv (group={group}) is not handled"
        return 1, 0, node.input[0], 1
    return f"op {op} is not handled"


def _classify(graph: _GraphIndex, name: str) -> Target | Skip | None:
    """A Target, a Skip with the reason, or None when the tensor never reaches a matrix multiplication."""
    tensor = graph.stored(name)
    rank = len(tensor.dims)
    uses = graph.final_uses(name, tuple(range(rank)))
    multiplies = [u for u in uses if u.node is not None and _is_matmul_like(u.node)]
    if not multiplies:
        return None
    first_op = multiplies[0].node.op_type  # type: ignore[union-attr]
    if name in graph.inputs:
        return Skip(name, first_op, "initializer is also a graph input: a caller may override it at run time")
    others = [u for u in uses if u not in multiplies]
    if others:
        what = ", ".join(sorted({u.node.op_type if u.node else u.label for u in others}))
        return Skip(name, first_op, f"also used by {what}, which would see the pruned values")
    dtype = str(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    quantized = any("DequantizeLinear" in u.through for u in multiplies)
    if quantized and not _dequantize_first(multiplies):
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
        consumers.append(
            Consumer(use.label, node.op_type, use.input_index, activation, activation_axis, node.output[0])
        )
    if len(axes) > 1:
        return Skip(name, first_op, f"consumers disagree on the K axis of the shared weight: {sorted(axes)}")
    if len({u.through for u in multiplies}) > 1:
        return Skip(name, first_op, "consumers see the shared weight through different ops")
    ((k_axis, out_axis),) = axes
    return Target(
        name, first_op, tuple(tensor.dims), dtype, k_axis, out_axis, tuple(consumers), multiplies[0].through
    )


def _is_matmul_like(node: onnx.NodeProto) -> bool:
    return node.op_type in ("MatMul", "Gemm", "Conv") or node.op_type in UNHANDLED_MATMUL_OPS


def _dequantize_first(uses: list[_Use]) -> bool:
    return all(u.through[:1] == ("DequantizeLinear",) for u in uses)


def _weights_from_inputs_or_folds(graph: _GraphIndex) -> list[Skip]:
    """Weight operands that are not stored tensors: a graph input, or a value computed from constants."""
    skips: list[Skip] = []
    for node in graph.graph.node:
        for index in _weight_slots(node):
            if index >= len(node.input) or not node.input[index]:
                continue
            source = _trace_back(graph, node.input[index])
            if source in graph.initializers or source in graph.constants:
                continue
            label = f"{graph.label(node)}:input{index}"
            if source in graph.inputs:
                skips.append(Skip(source, node.op_type, f"weight of {label} is a graph input, not a constant"))
            elif graph.is_constant(source):
                op = graph.producer[source].op_type
                skips.append(
                    Skip(source, node.op_type, f"weight of {label} is computed from constants by {op}; fold first")
                )
    return skips


def _weight_slots(node: onnx.NodeProto) -> tuple[int, ...]:
    return (1,) if node.op_type in ("MatMul", "Gemm", "Conv") else ()


def _trace_back(graph: _GraphIndex, name: str) -> str:
    """The stored tensor, graph input or computed value that ``name`` comes from through look-through ops."""
    while name not in graph.initializers and name not in graph.constants and name not in graph.inputs:
        node = graph.producer.get(name)
        if node is None or node.op_type not in LOOK_THROUGH:
            break
        name = node.input[0]
    return name


def _head_consumers(graph: _GraphIndex, targets: list[Target]) -> set[str]:
    """Consumer nodes that alone stand between the rest of the model and some graph output.

    Walking back from each graph output, stop at every matrix multiplication by a weight: if exactly one is met,
    it is that output's head (an LM or classifier projection). A residual path to another weight means no head.
    """
    weight_nodes = {c.node for t in targets for c in t.consumers}
    heads: set[str] = set()
    for output in graph.outputs:
        met: set[str] = set()
        stack, seen = [output], set()
        while stack:
            name = stack.pop()
            node = graph.producer.get(name)
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            label = graph.label(node)
            if label in weight_nodes:
                met.add(label)
                continue
            stack.extend(i for i in node.input if i)
        if len(met) == 1:
            heads |= met
    return heads
