"""Channel moments and hidden-state similarity for structured pruning, reduced inside ONNX Runtime.

A small tapped run of its own (the weight taps of :mod:`graphprune.calibration.taps` give Σx² per weight; shrink
needs Σx as well, per activation, and block similarities): each channel tap reduces an activation to Σx and Σx²
per channel, each pair tap reduces two hidden states to ⟨x, y⟩, ‖x‖², ‖y‖² per token. Only these small results
are fetched, accumulated in float64. The taps are added to the ``onnx_ir`` model only while it is serialised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphprune.algorithms.structured import block_influence
from graphprune.calibration.data import open_source
from graphprune.calibration.providers import import_ort, resolve_providers, session_options
from graphprune.calibration.request import CalibrationRequest
from graphprune.calibration.signature import model_inputs, validate_feed
from graphprune.errors import GraphpruneError
from graphprune.graph.model_io import to_proto


@dataclass(frozen=True)
class ChannelTap:
    value: str  # tensor name
    axis: int  # negative channel axis
    width: int  # channels on that axis
    rank: int | None = None  # the tensor's rank, needed when the channel axis is not the last


@dataclass
class Moments:
    """Σx, Σx² per channel and rows per tapped tensor; summed (1 - cos) and tokens per tapped pair."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    sumsq: dict[str, np.ndarray] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    pair_terms: dict[tuple[str, str], list[np.ndarray]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def influence(self, pair: tuple[str, str]) -> float:
        dot, na, nb = (np.concatenate(t) for t in zip(*self.pair_terms[pair], strict=True))
        return block_influence(dot, na, nb)


class _Taps:
    """Nodes, constants and outputs added to a graph, and removed again."""

    def __init__(self, model: ir.Model) -> None:
        self.graph = model.graph
        self.opset = model.opset_imports.get("", 18)
        self.nodes: list[ir.Node] = []
        self.constants: list[ir.Value] = []
        self.outputs: list[ir.Value] = []
        self.count = 0

    def _name(self, hint: str) -> str:
        self.count += 1
        return f"graphprune_moment_{self.count}_{hint}"

    def op(self, op: str, inputs: list[ir.Value], **attrs: object) -> ir.Value:
        node = ir.node(op, inputs, attributes=attrs, name=self._name(op))
        node.outputs[0].name = self._name(op.lower())
        self.graph.append(node)
        self.nodes.append(node)
        return node.outputs[0]

    def ints(self, values: list[int]) -> ir.Value:
        v = ir.Value(name=self._name("const"), const_value=ir.tensor(np.array(values, dtype=np.int64)))
        v.const_value.name = v.name  # type: ignore[union-attr]
        self.graph.register_initializer(v)
        self.constants.append(v)
        return v

    def reduce(self, op: str, x: ir.Value, axes: list[int]) -> ir.Value:
        if (op == "ReduceSum" and self.opset >= 13) or self.opset >= 18:
            return self.op(op, [x, self.ints(axes)], keepdims=0)
        return self.op(op, [x], axes=axes, keepdims=0)

    def output(self, value: ir.Value) -> str:
        value.dtype = value.dtype or ir.DataType.FLOAT
        self.graph.outputs.append(value)
        self.outputs.append(value)
        return value.name  # type: ignore[return-value]

    def float32(self, x: ir.Value) -> ir.Value:
        return x if x.dtype == ir.DataType.FLOAT else self.op("Cast", [x], to=ir.DataType.FLOAT)

    def remove(self) -> None:
        for _ in self.outputs:
            self.graph.outputs.pop()
        self.graph.remove(list(reversed(self.nodes)))
        for v in self.constants:
            self.graph.initializers.pop(v.name)  # type: ignore[arg-type]


def collect_moments(
    model: ir.Model,
    channels: Sequence[ChannelTap],
    pairs: Sequence[tuple[str, str]],
    request: CalibrationRequest,
    on_batch: Callable[[int], None] | None = None,
) -> Moments:
    """Run ``model`` over ``request``'s data and return the moments of ``channels`` and the ``pairs``' terms."""
    values = {v.name: v for v in model.graph.inputs}
    values |= {o.name: o for n in model.graph for o in n.outputs}
    taps = _Taps(model)
    fetch: list[tuple[str, object, str]] = []
    try:
        for tap in channels:
            x = taps.float32(values[tap.value])
            shape = values[tap.value].shape
            rank = tap.rank if tap.rank is not None else shape.rank() if shape is not None else None
            if tap.axis != -1:
                if rank is None:
                    raise GraphpruneError(f"tensor {tap.value}: unknown rank, cannot reduce its channel axis")
                c = rank + tap.axis
                x = taps.op("Transpose", [x], perm=[i for i in range(rank) if i != c] + [c])
            rows = taps.op("Reshape", [x, taps.ints([-1, tap.width])])
            fetch.append(("sum", tap.value, taps.output(taps.reduce("ReduceSum", rows, [0]))))
            fetch.append(("sumsq", tap.value, taps.output(taps.reduce("ReduceSumSquare", rows, [0]))))
            size = taps.op("Size", [rows])
            size.dtype = ir.DataType.INT64
            fetch.append(("size", tap.value, taps.output(size)))
        for a, b in pairs:
            xa, xb = taps.float32(values[a]), taps.float32(values[b])
            dot = taps.reduce("ReduceSum", taps.op("Mul", [xa, xb]), [-1])
            terms = [taps.reduce("ReduceSumSquare", x, [-1]) for x in (xa, xb)]
            for part, value in zip(("dot", "na", "nb"), [dot, *terms], strict=True):
                fetch.append((part, (a, b), taps.output(taps.op("Reshape", [value, taps.ints([-1])]))))
        proto = to_proto(model)  # every tensor's bytes inside, external ones read from their files
    finally:
        taps.remove()
    specs = model_inputs(proto)
    source = open_source(request.data, proto, specs, **request.options())
    ort = import_ort()
    try:
        session = ort.InferenceSession(
            proto.SerializeToString(), session_options(False), providers=resolve_providers(request.provider)
        )
    except Exception as exc:
        raise GraphpruneError(f"onnxruntime cannot run the model: {str(exc).splitlines()[0]}") from None
    del proto
    out = Moments(warnings=list(source.warnings))
    names = [name for _, _, name in fetch]
    seen = 0
    for label, feed in source:
        results = session.run(names, validate_feed(feed, specs, label))
        pending: dict[object, list[np.ndarray]] = {}
        for (part, key, _), array in zip(fetch, results, strict=True):
            if part == "sum":
                out.sums[key] = out.sums.get(key, 0) + array.astype(np.float64)  # type: ignore[index]
            elif part == "sumsq":
                out.sumsq[key] = out.sumsq.get(key, 0) + array.astype(np.float64)  # type: ignore[index]
            elif part == "size":
                out.rows[key] = out.rows.get(key, 0) + int(array) // len(out.sums[key])  # type: ignore[index]
            else:
                pending.setdefault(key, []).append(array.astype(np.float64))
        for key, terms in pending.items():
            out.pair_terms.setdefault(key, []).append(terms)  # type: ignore[arg-type]
        seen += 1
        if on_batch:
            on_batch(seen)
    if not seen:
        raise GraphpruneError("the calibration data is empty")
    return out
