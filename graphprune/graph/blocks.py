"""Residual blocks: find the repeating ``x + f(x)`` units of a network, and bypass some of them.

A residual ``Add(x, f(x))`` is an Add whose one input is an ancestor of the other through at least one stored
weight. The residual Adds that form one chain (each one's skip input descends from the previous one's output)
are the stream; a block is the repeating run of those Adds (attention + MLP in a transformer layer), found from
the number of weight multiplications in each branch. Bypassing a block makes its input flow on where its output
did, and drops every node and weight only the block used.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from graphprune.graph.groups import consumer_slot, producer_slots


@dataclass(frozen=True)
class Block:
    index: int
    input: ir.Value  # the stream entering the block
    output: ir.Value  # the stream leaving it
    adds: tuple[ir.Node, ...]


def _ancestry(value: ir.Value, target: ir.Value, limit: int = 5000) -> int | None:
    """Weights met on the way from ``value`` back to ``target`` (None when ``target`` is not an ancestor)."""
    seen: set[ir.Node] = set()
    stack = [value]
    weights = 0
    found = False
    while stack and len(seen) < limit:
        v = stack.pop()
        if v is target:
            found = True
            continue
        node = v.producer()
        if node is None or node in seen:
            continue
        seen.add(node)
        if producer_slots(node) is not None or (node.inputs and consumer_slot(node, 0) is not None):
            weights += 1
        stack.extend(i for i in node.inputs if i is not None and i.const_value is None)
    return weights if found else None


def find_blocks(model: ir.Model) -> list[Block]:
    """The residual blocks of the main graph, in order (empty when there is no residual stream)."""
    residual: list[tuple[ir.Node, ir.Value, int]] = []  # (add, skip input, weights in the branch)
    for node in model.graph:
        if node.op_type != "Add" or len(node.inputs) != 2:
            continue
        a, b = node.inputs
        if a is None or b is None or a.const_value is not None or b.const_value is not None:
            continue
        for skip, branch in ((a, b), (b, a)):
            weights = _ancestry(branch, skip)
            if weights:
                residual.append((node, skip, weights))
                break
    chain = _longest_chain(residual)
    if not chain:
        return []
    period = _period([w for _, _, w in chain])
    starts = list(range(0, len(chain), period))
    # A block ends where the next one's skip input is taken: after the last Add in a pre-norm network, after the
    # norm that follows it in a post-norm one (BERT). The last block ends after the same ops as the others.
    outputs = [chain[i + period][1] for i in starts[:-1]]
    tail = _ops_between(chain[starts[-2] + period - 1][0].outputs[0], outputs[-1]) if len(starts) > 1 else []
    outputs.append(_follow(chain[-1][0].outputs[0], tail))
    return [
        Block(k, chain[i][1], out, tuple(n for n, _, _ in chain[i : i + period]))
        for k, (i, out) in enumerate(zip(starts, outputs, strict=True))
    ]


def _ops_between(start: ir.Value, end: ir.Value) -> list[str]:
    """Op types on the single-use path from ``start`` to ``end`` (empty when it is not such a path)."""
    ops: list[str] = []
    value = start
    while value is not end:
        uses = [u for u in value.uses() if u.idx == 0]
        if len(uses) != 1 or len(ops) > 8:
            return []
        ops.append(uses[0].node.op_type)
        value = uses[0].node.outputs[0]
    return ops


def _follow(start: ir.Value, ops: list[str]) -> ir.Value:
    """Follow ``ops`` forward from ``start`` through first inputs; stop early where the graph differs."""
    value = start
    for op in ops:
        uses = [u for u in value.uses() if u.idx == 0 and u.node.op_type == op]
        if len(uses) != 1:
            return start
        value = uses[0].node.outputs[0]
    return value


def _longest_chain(residual: list[tuple[ir.Node, ir.Value, int]]) -> list[tuple[ir.Node, ir.Value, int]]:
    """The residual Adds linked output → (through non-weight ops) → next skip input, the longest such run."""
    nxt: dict[int, int] = {}
    for i, (_, skip, _) in enumerate(residual):
        for j in range(i - 1, -1, -1):  # the nearest earlier Add whose output the skip input comes from
            if _ancestry(skip, residual[j][0].outputs[0], limit=64) == 0:
                nxt[j] = i
                break
    starts = set(range(len(residual))) - set(nxt.values())
    best: list[int] = []
    for s in sorted(starts):
        run = [s]
        while run[-1] in nxt:
            run.append(nxt[run[-1]])
        best = max(best, run, key=len)
    return [residual[i] for i in best]


def _period(signature: list[int]) -> int:
    """The shortest period p with len % p == 0 under which the branch weight counts repeat."""
    n = len(signature)
    for p in range(1, n + 1):
        if n % p == 0 and all(signature[i] == signature[i % p] for i in range(n)):
            return p
    return n


def bypass_blocks(model: ir.Model, blocks: list[Block]) -> int:
    """Route each block's input to where its output went, remove what only the blocks used; parameters removed."""
    before = _parameters(model)
    for block in sorted(blocks, key=lambda b: -b.index):
        out = block.output
        if out.is_graph_output():
            index = list(model.graph.outputs).index(out)
            identity = ir.node("Identity", [block.input], name=f"graphprune_bypass_{block.index}")
            model.graph.append(identity)
            identity.outputs[0].name = out.name
            out.name = f"{out.name}_bypassed"
            model.graph.outputs[index] = identity.outputs[0]
        out.replace_all_uses_with(block.input)
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)
    for name, value in list(model.graph.initializers.items()):
        if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
            del model.graph.initializers[name]
    return before - _parameters(model)


def _parameters(model: ir.Model) -> int:
    import numpy as np

    return sum(int(np.prod(v.shape.numpy())) for v in model.graph.initializers.values() if v.shape is not None)
