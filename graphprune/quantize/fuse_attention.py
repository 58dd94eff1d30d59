"""Replace an exported attention core by ONNX Runtime's fused ``com.microsoft.MultiHeadAttention`` kernel.

The exporters write ``softmax(Q·Kᵀ·scale + bias)·V`` as two batched MatMuls, a mask Add, a Softmax (and, from
PyTorch's dynamo exporter, a NaN guard ``Where(IsNaN(p), 0, p)``), each a pass over ``[batch, heads, seq, seq]``.
ONNX Runtime's CPU optimiser fuses none of them, and its transformer optimiser
(``onnxruntime.transformers.optimizer``) recognises the legacy exporter's BERT but fuses nothing in a dynamo
export (all-MiniLM-L6: 0 of 6). MultiHeadAttention takes the 3-D projections ``[batch, seq, heads·head]`` and an
additive ``attention_bias``; without a bias ONNX Runtime runs it as a flash kernel (tiles of Q, K and V in L2,
no score tensor), with one it adds the bias, softmaxes and multiplies head by head. An input without padding
makes the exporters' mask bias all zeros, so the fused node sits in an ``If`` on ``max |bias| == 0``: the
flash kernel without the bias then (adding zeros changes nothing), the bias otherwise.

Matched, per Softmax over the last axis (everything else is refused with a reason, and left as it is):

* ``P = Softmax(S)``, ``S = MatMul(Qh, Kt)`` times / divided by scalar constants, plus at most one bias term
  (added after the scaling);
* ``Qh`` = ``Transpose(0,2,1,3)(Reshape(q, [B, S, N, H]))`` of a 3-D ``q``, then fed as ``q`` itself; or any
  other 4-D ``[B, N, S, H]`` tensor with N and H known (queries after rotary embeddings), merged back to
  ``[B, S, N·H]`` for the kernel;
* ``Kt`` is ``Kh`` with its last two axes swapped, in one of the three forms the exporters write:
  ``Transpose(0,2,3,1)`` of the split, ``Transpose(0,1,3,2)`` of ``Kh``, or dynamo's
  ``Reshape([-1, L, H]) → Transpose(0,2,1) → Reshape([B, N, H, L])`` of ``Kh``; ``Kh`` and ``Vh`` are fed as
  their 3-D projections when both are proven head splits, else as ``[B, N, L, H]`` tensors (rotary keys, keys
  and values repeated for grouped-query attention), which the kernel also reads;
* ``P`` (or its NaN guard) is the first operand of ``MatMul(·, Vh)``, whose output goes through
  ``Transpose(0,2,1,3)`` into a ``Reshape`` back to ``[B, S, N·H]``.

Attention is computed independently for every (B, N) pair, so a ``[B, N, S, H]`` tensor needs no proof of how it
was made; batch and key length must still be provably shared by Q, K and V.

Reshape targets are read with :mod:`graphprune.quantize.shape_tokens`: batch and sequence sizes must be provably
those of the projection. The bias is expanded to ``[·, ·, S, L]`` (MultiHeadAttention reads four dimensions
with only the first two broadcast). Only the main graph is rewritten. A guarded core keeps its guard on the fused
output (``Where(IsNaN(y), 0, y)``, equal to the original wherever V is finite). The rewrite is not bit-exact:
the fused kernel sums in another order (measured deviations in BENCHMARKS.md, "Fused attention for ONNX
Runtime").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphprune.graph.prepare import drop_dead, infer_shapes
from graphprune.quantize.attention import constant_scalar, is_nan_guard
from graphprune.quantize.qdq import Names, constant
from graphprune.quantize.shape_tokens import Token, dim_token, shape_tokens

MS_DOMAIN = "com.microsoft"
_DEFAULT = ("", "ai.onnx")


@dataclass
class _Heads:
    """Queries, keys or values in heads: ``bnsh`` is the ``[B, N, S, H]`` tensor (None for keys the legacy
    exporter transposes straight to ``[B, N, H, L]``), ``projection`` the 3-D ``[B, S, N·H]`` it was proven to be
    split from (None when it was not: rotary embeddings, keys and values repeated for grouped-query attention)."""

    bnsh: ir.Value | None
    heads: int
    head_size: int
    projection: ir.Value | None = None


@dataclass
class _Core:
    query: _Heads
    key: _Heads
    value: _Heads
    scale: float
    bias: ir.Value | None
    guarded: bool
    output: ir.Value  # the 3-D ``[B, S, N·H]`` tensor that the fused node replaces
    nodes: list[ir.Node]  # the matched nodes, removed once nothing reads them
    four_d: bool  # keys and values fed in heads, [B, N, L, H], not as 3-D projections


class _Refused(Exception):
    """The reason one attention core does not match."""


def fuse_attention(model: ir.Model) -> tuple[list[str], list[str]]:
    """Fuse every matching attention core of the main graph in place: the fused outputs' names, and
    ``"<softmax output>: <reason>"`` for every Softmax feeding a MatMul that was left unfused."""
    graph = model.graph
    if model.opset_imports.get("", 0) < 13:  # Softmax over one axis (and Slice/Unsqueeze inputs) from 13
        return [], []
    candidates = [n for n in graph if n.op_type == "Softmax" and n.domain in _DEFAULT and _feeds_matmul(n)]
    if not candidates:
        return [], []
    infer_shapes(model)  # legacy exports carry no shapes; the matcher must know each projection is 3-D
    names = Names(graph)
    fused: list[str] = []
    refused: list[str] = []
    zero_tests: dict[int, ir.Value] = {}  # id(bias) → whether it is all zeros
    for softmax in candidates:
        try:
            core = _match(graph, softmax)
        except _Refused as reason:
            refused.append(f"{softmax.outputs[0].name}: {reason}")
            continue
        _replace(graph, names, core, zero_tests)
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        fused.append(str(core.output.name))
    return fused, refused


def _feeds_matmul(softmax: ir.Node) -> bool:
    """Attention's softmax: read by a MatMul directly or through the exporter's NaN guard."""
    for use in softmax.outputs[0].uses():
        node = use.node
        if node.op_type == "Where" and is_nan_guard(node):
            return any(u.node.op_type == "MatMul" for u in node.outputs[0].uses())
        if node.op_type == "MatMul":
            return True
    return False


def _match(graph: ir.Graph, softmax: ir.Node) -> _Core:
    probabilities = softmax.outputs[0]
    rank = probabilities.shape.rank() if probabilities.shape is not None else None
    axis = softmax.attributes.get_int("axis", -1)
    if axis != -1 and not (rank == 4 and axis == 3):
        raise _Refused(f"softmax over axis {axis}, not the last of four")
    matmul, guarded, matched = _probabilities_matmul(graph, probabilities)
    scores, scale, bias, pre = _scores(softmax.inputs[0])
    qk = scores.producer()
    if qk is None or qk.op_type != "MatMul" or qk.domain not in _DEFAULT:
        raise _Refused("the scores are not a MatMul of queries and keys")
    query, q_nodes, q_scale = _heads(qk.inputs[0], "query")
    key, k_nodes, k_scale = _transposed_keys(qk.inputs[1])
    value, v_nodes, v_scale = _heads(matmul.inputs[1], "value")
    if v_scale != 1.0:
        raise _Refused("the values are scaled")
    sizes = {(h.heads, h.head_size) for h in (query, key, value)}
    if len(sizes) != 1:
        raise _Refused(f"queries, keys and values split into different heads: {sorted(sizes)}")
    four_d = key.projection is None or value.projection is None
    if four_d or query.projection is None:  # tensors in heads: MatMul would broadcast a batch of 1, the kernel not
        _check_heads_agree(query, key, value)
    inputs = (
        [query.projection or query.bnsh, key.bnsh, value.bnsh] if four_d else [key.projection, value.projection]
    )
    if any(v is None or v.dtype != ir.DataType.FLOAT for v in inputs):
        raise _Refused("the projections are not float32 (ONNX Runtime's CPU kernel is float32 only)")
    output, out_nodes = _merged_output(matmul.outputs[0], query)
    nodes = [*q_nodes, *k_nodes, *v_nodes, qk, *pre, softmax, *matched, matmul, *out_nodes]
    if any(n.graph is not graph for n in nodes):
        raise _Refused("part of it lies inside a subgraph")
    return _Core(query, key, value, scale * q_scale * k_scale, bias, guarded, output, nodes, four_d)


def _check_heads_agree(query: _Heads, key: _Heads, value: _Heads) -> None:
    """Keys and values fed in heads (``[B, N, L, H]``): same batch as the queries, same length as each other."""
    if key.bnsh is None or value.bnsh is None or query.bnsh is None:
        raise _Refused(
            "the keys are transposed straight from their split, but the queries or values are not split"
        )
    batch = {dim_token(h.bnsh, 0) for h in (query, key, value)}  # type: ignore[arg-type]  # checked above
    if len(batch) != 1 or None in batch or dim_token(key.bnsh, 2) != dim_token(value.bnsh, 2):
        raise _Refused(
            "queries, keys and values do not provably share their batch, or keys and values their length"
        )


def _probabilities_matmul(graph: ir.Graph, p: ir.Value) -> tuple[ir.Node, bool, list[ir.Node]]:
    """The MatMul reading the probabilities ``p`` as its first operand, whether through a NaN guard, and the
    guard's nodes."""
    uses = list(p.uses())
    guard = next((u.node for u in uses if u.node.op_type == "Where" and is_nan_guard(u.node)), None)
    matched: list[ir.Node] = []
    if guard is not None:
        test = guard.inputs[0].producer()  # type: ignore[union-attr]  # is_nan_guard checked it
        assert test is not None
        if len(uses) != 2 or len(test.outputs[0].uses()) != 1:
            raise _Refused("the probabilities have readers besides their NaN guard")
        matched, p = [test, guard], guard.outputs[0]
        uses = list(p.uses())
    if p in graph.outputs or len(uses) != 1 or uses[0].idx != 0 or uses[0].node.op_type != "MatMul":
        raise _Refused("the probabilities are read by more than the MatMul with the values")
    return uses[0].node, guard is not None, matched


def _scores(value: ir.Value | None) -> tuple[ir.Value, float, ir.Value | None, list[ir.Node]]:
    """The Q·Kᵀ MatMul's output under scalar factors and at most one additive bias: (it, the factor, the bias,
    the nodes passed)."""
    scale, bias, passed = 1.0, None, []
    while value is not None:
        node = value.producer()
        if node is None or node.domain not in _DEFAULT:
            break
        found = _scalar_factor(node)
        if found is not None:
            scale, value = scale * found[0], found[1]
            passed.append(node)
            continue
        if node.op_type == "Add" and bias is None and len(node.inputs) == 2:
            if scale != 1.0:  # (Q·Kᵀ + bias)·c scales the bias too; the kernel adds it unscaled
                raise _Refused("the scores are scaled after the bias is added")
            a, b = node.inputs
            # the scores side comes from the Q·Kᵀ MatMul (through scalars); the other is the bias
            side = next((i for i, v in enumerate((a, b)) if _reaches_matmul(v)), None)
            if side is None:
                break
            bias, value = node.inputs[1 - side], node.inputs[side]
            passed.append(node)
            continue
        break
    if value is None:
        raise _Refused("the scores have no producer")
    if bias is not None and bias.dtype != ir.DataType.FLOAT:
        raise _Refused("the attention bias is not known to be float32")
    rank = bias.shape.rank() if bias is not None and bias.shape is not None else None
    if bias is not None and (rank is None or rank > 4):
        raise _Refused("the attention bias has more than four dimensions, or an unknown number")
    return value, scale, bias, passed


def _reaches_matmul(value: ir.Value | None) -> bool:
    inner, _, _ = _strip_scalars(value)
    return _producer(inner, "MatMul") is not None


def _scalar_factor(node: ir.Node) -> tuple[float, ir.Value] | None:
    """``x · c``, ``c · x`` or ``x / c`` with a finite non-zero scalar constant c: (the factor, x), else None."""
    if node.op_type not in ("Mul", "Div") or len(node.inputs) != 2 or node.domain not in _DEFAULT:
        return None
    x, c = node.inputs[0], _scalar(node.inputs[1])
    if node.op_type == "Mul" and c is None:
        x, c = node.inputs[1], _scalar(node.inputs[0])
    if x is None or c is None or c == 0.0 or not np.isfinite(c):
        return None
    return (c if node.op_type == "Mul" else 1.0 / c), x


def _scalar(value: ir.Value | None) -> float | None:
    """A one-element constant of rank 0 or 1 (a higher rank could broadcast the other operand up)."""
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return constant_scalar(value) if tensor is not None and len(tensor.shape) <= 1 else None


def _strip_scalars(value: ir.Value | None) -> tuple[ir.Value | None, float, list[ir.Node]]:
    scale, passed = 1.0, []
    while value is not None and (node := value.producer()) is not None:
        found = _scalar_factor(node)
        if found is None:
            break
        scale, value = scale * found[0], found[1]
        passed.append(node)
    return value, scale, passed


def _producer(value: ir.Value | None, op: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op and node.domain in _DEFAULT else None


def _perm(node: ir.Node | None) -> list[int] | None:
    if node is None:
        return None
    perm = node.attributes.get_ints("perm")
    return list(perm) if perm is not None else None


def _heads(value: ir.Value | None, what: str) -> tuple[_Heads, list[ir.Node], float]:
    """``Transpose(0,2,1,3)(Reshape(x, [B, S, N, H]))`` of a 3-D ``x``, else any 4-D ``[B, N, S, H]`` tensor whose
    N and H are known; scalar factors after it are returned as one."""
    inner, scale, passed = _strip_scalars(value)
    transpose = _producer(inner, "Transpose")
    if transpose is not None and _perm(transpose) == [0, 2, 1, 3]:
        try:
            heads, reshape = _split(transpose.inputs[0], what)
            heads.bnsh = inner
            return heads, [*passed, transpose, reshape], scale
        except _Refused:
            pass  # not a proven split; the transpose's output is still in heads
    return _opaque(inner, what), passed, scale


def _opaque(value: ir.Value | None, what: str) -> _Heads:
    """A ``[B, N, S, H]`` tensor computed some other way: attention is the same for every (B, N) pair whatever
    made it, so only N and H must be known."""
    shape = value.shape if value is not None else None
    if value is None or shape is None or shape.rank() != 4:
        raise _Refused(f"the {what} are neither a head split nor a 4-D tensor of known shape")
    heads, size = shape[1], shape[3]
    if not isinstance(heads, int) or not isinstance(size, int) or heads <= 0 or size <= 0:
        raise _Refused(f"the head count or size of the {what} is not known")
    return _Heads(value, heads, size)


def _split(value: ir.Value | None, what: str) -> tuple[_Heads, ir.Node]:
    """``Reshape(x, [B, S, N, H])`` of a 3-D ``x = [B, S, N·H]``."""
    reshape = _producer(value, "Reshape")
    if reshape is None:
        raise _Refused(f"the {what} are not split into heads by a Reshape")
    x = reshape.inputs[0]
    if x is None or x.shape is None or x.shape.rank() != 3:
        raise _Refused(f"the {what} projection is not known to be 3-D")
    target = _target(reshape)
    if target is None or len(target) != 4:
        raise _Refused(f"the {what} head split's target shape is not understood")
    b, s, n, h = target
    if b != dim_token(x, 0) or s != dim_token(x, 1):
        raise _Refused(f"the {what} head split does not keep batch and sequence")
    width = dim_token(x, 2)
    if not isinstance(h, int) or h <= 0 or not isinstance(n, int):
        raise _Refused(f"the {what} head count or size is not a constant")
    if n == -1 and isinstance(width, int) and width % h == 0:
        n = width // h
    if n <= 0 or (isinstance(width, int) and n * h != width) or (not isinstance(width, int) and n == -1):
        raise _Refused(f"the {what} head split does not divide the width {width} into heads of {h}")
    return _Heads(None, n, h, projection=x), reshape


def _target(reshape: ir.Node) -> list[Token] | None:
    """A Reshape's target as tokens, its zeros (copy the input's size) resolved unless ``allowzero``."""
    x = reshape.inputs[0]
    target = shape_tokens(reshape.inputs[1])
    if target is None or x is None:
        return None
    if reshape.attributes.get_int("allowzero", 0):
        return target if 0 not in target else None
    resolved = [dim_token(x, i) if t == 0 else t for i, t in enumerate(target)]
    return None if any(t is None for t in resolved) else resolved  # type: ignore[return-value]


def _transposed_keys(value: ir.Value | None) -> tuple[_Heads, list[ir.Node], float]:
    """The keys split into heads with the last two axes swapped, ``[B, N, H, L]``."""
    inner, scale, passed = _strip_scalars(value)
    transpose = _producer(inner, "Transpose")
    if transpose is not None and _perm(transpose) == [0, 2, 3, 1]:  # legacy export: straight from the split
        heads, reshape = _split(transpose.inputs[0], "keys")
        return heads, [*passed, transpose, reshape], scale
    if transpose is not None and _perm(transpose) == [0, 1, 3, 2]:
        heads, nodes, scale2 = _heads(transpose.inputs[0], "keys")
        return heads, [*passed, transpose, *nodes], scale * scale2
    unmerge = _producer(inner, "Reshape")  # dynamo: merge (B, N), swap, split again
    swap = _producer(unmerge.inputs[0], "Transpose") if unmerge is not None else None
    merge = _producer(swap.inputs[0], "Reshape") if swap is not None else None
    if unmerge is None or swap is None or merge is None or _perm(swap) != [0, 2, 1]:
        raise _Refused("the keys are not transposed in a form this matcher knows")
    kh = merge.inputs[0]
    if kh is None:
        raise _Refused("the keys are not transposed in a form this matcher knows")
    d = [dim_token(kh, i) for i in range(4)]
    merged, unmerged = _target(merge), _target(unmerge)
    if None in d or merged is None or unmerged is None:
        raise _Refused("the keys' transpose uses shapes this matcher cannot read")
    if merged[0] != -1 or merged[1:] != d[2:] or unmerged != [d[0], d[1], d[3], d[2]]:
        raise _Refused("the keys' reshapes do not swap their last two axes")
    heads, nodes, scale2 = _heads(kh, "keys")
    return heads, [*passed, unmerge, swap, merge, *nodes], scale * scale2


def _merged_output(value: ir.Value, query: _Heads) -> tuple[ir.Value, list[ir.Node]]:
    """``Reshape(Transpose(0,2,1,3)(P·V), [B, S, N·H])``: the 3-D attention output. Other readers of the
    intermediates (the legacy exporter's ``Shape`` nodes) keep them alive, unchanged."""
    transpose = _reader(value, "Transpose")
    if transpose is None or _perm(transpose) != [0, 2, 1, 3]:
        raise _Refused("the attention output is not transposed back to [B, S, N, H]")
    t = transpose.outputs[0]
    reshape = _reader(t, "Reshape")
    if reshape is None:
        raise _Refused("the attention output is not merged back into one width")
    target = _target(reshape)
    width = query.heads * query.head_size
    if target is None or len(target) != 3:
        raise _Refused("the attention output's merge has a target shape this matcher cannot read")
    source = query.projection or t
    if target[0] not in (dim_token(t, 0), dim_token(source, 0)):
        raise _Refused("the attention output's merge does not keep the batch")
    if target[1] not in (dim_token(t, 1), dim_token(source, 1)) or target[2] not in (-1, width):
        raise _Refused("the attention output's merge is not [B, S, heads · head size]")
    return reshape.outputs[0], [transpose, reshape]


def _reader(value: ir.Value, op: str) -> ir.Node | None:
    """The one node of type ``op`` that reads ``value`` as its first input, not counting ``Shape`` readers."""
    readers = [u for u in value.uses() if u.node.op_type != "Shape"]
    if len(readers) != 1 or readers[0].idx != 0 or readers[0].node.op_type != op:
        return None
    return readers[0].node


def _replace(graph: ir.Graph, names: Names, core: _Core, zero_tests: dict[int, ir.Value]) -> None:
    """Insert the fused node after the merge it replaces, point every reader at it, drop the dead nodes."""
    label = str(core.output.name)
    added: list[ir.Node] = []
    query = core.query.projection
    if query is None:  # the kernel reads queries as [B, S, N·H] only
        query, nodes = _merge_heads(graph, names, core.query, label)
        added += nodes
    kv = [core.key.bnsh, core.value.bnsh] if core.four_d else [core.key.projection, core.value.projection]
    projections: list[ir.Value | None] = [query, *kv]
    if core.bias is None:
        fused = ir.Value(name=names(f"{label}_mha"), type=core.output.type, shape=core.output.shape)
        added.append(_mha(names, core, projections, fused, label))
    else:
        test = zero_tests.get(id(core.bias))
        if test is None:
            test, nodes = _all_zero(graph, names, core.bias, label)
            zero_tests[id(core.bias)] = test
            added += nodes
        fused = ir.Value(name=names(f"{label}_mha"), type=core.output.type, shape=core.output.shape)
        added.append(_branches(graph, names, core, projections, test, fused, label))
    result = fused
    if core.guarded:  # the exporter zeroed NaN (fully masked) rows: zero them on the fused output instead
        zero = constant(graph, names, f"{label}_zero", np.array(0.0, np.float32))
        nan = ir.Value(name=names(f"{label}_is_nan"))
        result = ir.Value(name=names(f"{label}_guarded"), type=core.output.type, shape=core.output.shape)
        added += [
            ir.Node("", "IsNaN", [fused], outputs=[nan], name=names(f"{label}_IsNaN")),
            ir.Node("", "Where", [nan, zero, fused], outputs=[result], name=names(f"{label}_Guard")),
        ]
    graph.insert_after(core.output.producer(), added)  # type: ignore[arg-type]  # the merge Reshape
    core.output.replace_all_uses_with(result)
    if core.output in graph.outputs:
        graph.outputs[list(graph.outputs).index(core.output)] = result
    for node in reversed(core.nodes):  # readers before producers
        drop_dead(graph, list(node.outputs))


def _merge_heads(graph: ir.Graph, names: Names, heads: _Heads, label: str) -> tuple[ir.Value, list[ir.Node]]:
    """``Reshape(Transpose(0,2,1,3)(x), [0, 0, N·H])``: queries in heads back to ``[B, S, N·H]``."""
    assert heads.bnsh is not None  # queries always come in heads
    width = constant(
        graph, names, f"{label}_query_width", np.array([0, 0, heads.heads * heads.head_size], np.int64)
    )
    swapped = ir.Value(name=names(f"{label}_query_bsnh"))
    merged = ir.Value(name=names(f"{label}_query_3d"), type=heads.bnsh.type)
    nodes = [
        ir.Node(
            "",
            "Transpose",
            [heads.bnsh],
            [ir.AttrInt64s("perm", [0, 2, 1, 3])],
            outputs=[swapped],
            name=names(f"{label}_QueryBSNH"),
        ),
        ir.Node("", "Reshape", [swapped, width], outputs=[merged], name=names(f"{label}_Query3D")),
    ]
    return merged, nodes


def _mha(names: Names, core: _Core, inputs: list[ir.Value | None], out: ir.Value, label: str) -> ir.Node:
    attributes = [ir.AttrInt64("num_heads", core.query.heads), ir.AttrFloat32("scale", core.scale)]
    name = names(f"{label}_MultiHeadAttention")
    return ir.Node(MS_DOMAIN, "MultiHeadAttention", inputs, attributes, outputs=[out], name=name)


def _all_zero(graph: ir.Graph, names: Names, bias: ir.Value, label: str) -> tuple[ir.Value, list[ir.Node]]:
    """``ReduceMax(Abs(bias)) == 0``: computed once per bias, which every layer of a model usually shares."""
    zero = constant(graph, names, f"{label}_bias_zero", np.array(0.0, np.float32))
    magnitude = ir.Value(name=names(f"{label}_bias_abs"))
    peak = ir.Value(name=names(f"{label}_bias_peak"))
    test = ir.Value(name=names(f"{label}_bias_is_zero"))
    nodes = [
        ir.Node("", "Abs", [bias], outputs=[magnitude], name=names(f"{label}_BiasAbs")),
        ir.Node(
            "",
            "ReduceMax",
            [magnitude],
            [ir.AttrInt64("keepdims", 0)],
            outputs=[peak],
            name=names(f"{label}_BiasPeak"),
        ),
        ir.Node("", "Equal", [peak, zero], outputs=[test], name=names(f"{label}_BiasIsZero")),
    ]
    return test, nodes


def _branches(
    graph: ir.Graph,
    names: Names,
    core: _Core,
    projections: list[ir.Value | None],
    test: ir.Value,
    out: ir.Value,
    label: str,
) -> ir.Node:
    """``If(bias is all zero)``: MultiHeadAttention without the bias, which runs ONNX Runtime's flash kernel
    (adding zeros changes nothing), else with it, expanded to the four dimensions the kernel reads."""
    plain = ir.Value(name=names(f"{label}_mha_unmasked"), type=out.type, shape=out.shape)
    then_branch = ir.Graph(
        [], [plain], nodes=[_mha(names, core, projections, plain, label)], name=names(f"{label}_unmasked")
    )
    masked = ir.Value(name=names(f"{label}_mha_masked"), type=out.type, shape=out.shape)
    query = projections[0]  # the 3-D queries: their length is the bias's third dimension
    assert core.bias is not None and query is not None
    bias, nodes = _expand_bias(graph, names, core.bias, query, label)
    nodes.append(_mha(names, core, [*projections, None, None, bias], masked, label))
    else_branch = ir.Graph([], [masked], nodes=nodes, name=names(f"{label}_masked"))
    attributes = [ir.AttrGraph("then_branch", then_branch), ir.AttrGraph("else_branch", else_branch)]
    return ir.Node("", "If", [test], attributes, outputs=[out], name=names(f"{label}_IfUnmasked"))


def _expand_bias(
    graph: ir.Graph, names: Names, bias: ir.Value, query: ir.Value, label: str
) -> tuple[ir.Value, list[ir.Node]]:
    """``Expand(bias, [1, 1, S, 1])``: MultiHeadAttention reads a bias of four dimensions whose third is the query
    length (a key-padding mask ``[B, 1, 1, L]`` broadcasts it)."""
    one = constant(graph, names, f"{label}_bias_ones", np.array([1, 1], np.int64))
    unit = constant(graph, names, f"{label}_bias_one", np.array([1], np.int64))
    start = constant(graph, names, f"{label}_seq_start", np.array([1], np.int64))
    end = constant(graph, names, f"{label}_seq_end", np.array([2], np.int64))
    shape = ir.Value(name=names(f"{label}_query_shape"))
    length = ir.Value(name=names(f"{label}_query_length"))
    target = ir.Value(name=names(f"{label}_bias_shape"))
    out = ir.Value(name=names(f"{label}_bias_4d"), type=bias.type)
    nodes = [
        ir.Node("", "Shape", [query], outputs=[shape], name=names(f"{label}_QueryShape")),
        ir.Node("", "Slice", [shape, start, end], outputs=[length], name=names(f"{label}_QueryLength")),
        ir.Node(
            "",
            "Concat",
            [one, length, unit],
            [ir.AttrInt64("axis", 0)],
            outputs=[target],
            name=names(f"{label}_BiasShape"),
        ),
        ir.Node("", "Expand", [bias, target], outputs=[out], name=names(f"{label}_BiasExpand")),
    ]
    return out, nodes
