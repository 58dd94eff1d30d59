"""The dense model beside the pruned one in sequential calibration, and the cross-Gram matrices that pair them.

Dense-target reconstruction (:mod:`graphprune.algorithms.dense_target`) needs, for every weight, the cross-Gram
``C = Σ x_denseᵀ x_pruned`` of the dense model's and the pruned model's inputs of that weight on the same windows.
The sequential engine (:mod:`graphprune.pipeline.sequential`) runs the pruned model segment by segment on the
boundary tensors of the already pruned prefix; :class:`DenseStream` runs the same segments on the *dense* model,
on its own boundary tensors (the dense prefix's outputs), kept in a second
:class:`~graphprune.pipeline.boundary.BoundaryTensors` that spills to disk like the first.

Per group and batch: the dense segment (the group's nodes with every weight as it was before pruning) computes
the dense activations of the group's taps and the dense boundary tensors for later segments; the activations go
into the pruned segment as extra graph inputs, where one MatMul tap per activation,
``(x_dense rows)ᵀ @ (x_pruned rows)``, reduces them against the pruned activations inside ONNX Runtime (only the
``K x K`` result is fetched). Two sessions per group are open at once, so a group costs twice its weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from graphprune.calibration.gram_taps import StagedSum, sample_rows
from graphprune.calibration.session import Session, cut, outer_reads, session_model, values_by_name
from graphprune.calibration.taps import Tap, TapBuilder, TapPlan, as_rows
from graphprune.graph.stored import replace_tensor, stored_tensor, stored_values
from graphprune.graph.targets import Target
from graphprune.pipeline.boundary import BoundaryTensors


class DenseStream:
    """The dense model's boundary tensors and, per group, its segment and the cross-Gram taps.

    Built before any weight is pruned: it keeps the targets' tensors as they are then (lazy views of the input's
    data files for external weights, so nothing is read into memory until a dense segment needs it).
    """

    def __init__(
        self,
        model: ir.Model,
        targets: Sequence[Target],
        providers: list[str],
        store: BoundaryTensors,
        also: Sequence[str] = (),
    ):
        """``also``: other stored tensors the dense segments must see as they are now (a bias that ``shrink``'s
        refit will change)."""
        stored = stored_values(model.graph)
        names = [*(t.name for t in targets), *also]
        self.values = {name: stored[name] for name in names}
        self.dense = {name: stored_tensor(stored[name]) for name in names}
        self.providers = providers
        self.store = store
        self._session: Session | None = None
        self._inputs: list[str] = []
        self._outputs: list[str] = []  # the dense session's outputs: activations, then boundary tensors
        self._keep: list[str] = []
        self._feeds: dict[str, str] = {}  # dense activation name -> the pruned segment's input that carries it
        self._taps: list[tuple[Tap, str]] = []  # (a Gram tap, its cross-Gram output)
        self._sums: list[StagedSum] = []
        self._dense_sum_outputs: list[str] = []  # per tap: Σ x_dense over the rows (the dense input's mean)
        self._dense_sums: list[np.ndarray] = []

    def start(self, batches: Sequence[Mapping[str, np.ndarray]], names: Sequence[str]) -> None:
        """The graph inputs ``names`` of every batch: the boundary tensors both streams start from."""
        for name in names:
            for batch in batches:
                self.store.append(name, batch[name])

    def add_taps(
        self, model: ir.Model, plan: TapPlan, types: Mapping[str, tuple[int, int | None]], warnings: list[str]
    ) -> dict:
        """Add a cross-Gram tap for every Gram tap of ``plan`` (inside its :func:`plan_taps` block); returns the
        extra inputs of the pruned segment, as ``{value: carrier}`` for :func:`tapped_model`'s ``available``."""
        values = values_by_name(model.graph)
        b = TapBuilder(model, values, plan)
        b.taken.update(str(n.name) for n in plan.nodes)
        b.taken.update(str(v.name) for n in plan.nodes for v in n.outputs)
        b.taken.update(str(v.name) for v in plan.constants)
        self._taps, self._feeds, carriers, self._dense_sum_outputs = [], {}, {}, []
        for tap in plan.taps:
            if tap.gram is None:
                continue
            elem_type, rank = types.get(tap.activation, (onnx.TensorProto.UNDEFINED, None))
            if elem_type == onnx.TensorProto.UNDEFINED:
                warnings.append(f"no dense target for the readers of {tap.activation!r}: its type is unknown")
                continue
            b.anchor = values[tap.activation]
            dims = None if rank is None else ir.Shape([f"{tap.activation}_dense_d{i}" for i in range(rank)])
            dense = ir.Value(name=b.fresh("dense"), type=ir.TensorType(ir.DataType(elem_type)), shape=dims)
            pruned_rows = rows_matrix(b, values[tap.activation], elem_type, tap.axis, rank, tap.k)
            dense_rows = rows_matrix(b, dense, elem_type, tap.axis, rank, tap.k)
            if pruned_rows is None or dense_rows is None:
                continue  # rank unknown and K not last: plan_taps has warned that it has no Gram either
            # the rows of the Gram matrix, from both tensors (shapes alike): the cross terms pair the same rows
            pruned, dense_sample = (
                sample_rows(b, model, values[tap.activation], rows, tap.axis, tap.gram.sampling)
                for rows in (pruned_rows, dense_rows)
            )
            cross = b.node(
                "MatMul",
                [b.node("Transpose", [dense_sample.rows], "dense_t", perm=[1, 0]), pruned.rows],
                "cross",
            )
            b.output(cross, ir.DataType.FLOAT, [tap.k, tap.k])
            dense_sum = dense_sample.total
            if dense_sum is None:  # every row
                dense_sum = b.reduce_sum(dense_sample.rows, [0])
            b.output(dense_sum, ir.DataType.FLOAT, [tap.k])
            self._taps.append((tap, str(cross.name)))
            self._dense_sum_outputs.append(str(dense_sum.name))
            self._feeds[tap.activation] = str(dense.name)
            carriers[dense] = dense
        self._sums = [StagedSum((tap.k, tap.k)) for tap, _ in self._taps]  # staged as the Gram matrices are
        self._dense_sums = [np.zeros(tap.k) for tap, _ in self._taps]
        return carriers

    def open(self, model: ir.Model, keep: Sequence[ir.Value], carriers: Mapping[ir.Value, ir.Value]) -> None:
        """The dense segment: the tapped activations and the boundary tensors ``keep``, from the dense boundary
        tensors (``carriers``: the held values and the inputs that carry them), with every weight dense."""
        values = values_by_name(model.graph)
        activations = [values[name] for name in self._feeds if values[name] not in carriers]
        outputs = list(dict.fromkeys([*activations, *keep]))
        self._keep, self._outputs = [str(v.name) for v in keep], [str(v.name) for v in outputs]
        if not outputs:  # the tapped activations are all boundary tensors already: nothing to run
            self._session, self._inputs = None, []
            return
        nodes = cut(model.graph, outputs, carriers)
        read = {v for n in nodes for v in outer_reads(n)} | set(outputs)
        inputs = [carrier for value, carrier in carriers.items() if value in read]
        pruned = {
            name: stored_tensor(v) for name, v in self.values.items() if stored_tensor(v) is not self.dense[name]
        }
        for name in pruned:  # the segment is serialised with the dense weights; the model keeps the pruned ones
            replace_tensor(self.values[name], self.dense[name])
        try:
            segment = session_model(model, nodes, inputs, outputs)
        finally:
            for name, tensor in pruned.items():
                replace_tensor(self.values[name], tensor)
        self._session = Session(segment, self.providers)
        self._inputs = [str(v.name) for v in inputs]

    def run(self, batch: int, total: int) -> dict[str, np.ndarray]:
        """Run the dense segment on one batch: keep its boundary tensors, return the extra feed."""
        arrays: dict[str, np.ndarray] = {}
        if self._outputs:
            assert self._session is not None
            feed = {name: self.store.get(name, batch) for name in self._inputs}
            label = f"the dense model's segment, batch {batch + 1} of {total}"
            arrays = dict(zip(self._outputs, self._session.run(self._outputs, feed, label), strict=True))
        for name in self._keep:
            self.store.append(name, arrays[name])
        return {carrier: arrays[name] if name in arrays else self.store.get(name, batch) for name, carrier in
                self._feeds.items()}  # fmt: skip

    def add(self, names: Sequence[str], outputs: Sequence[np.ndarray]) -> None:
        """Accumulate the cross-Gram outputs of one batch of the pruned segment (float64 sums, staged)."""
        index = {name: i for i, name in enumerate(names)}
        for staged, (_, output) in zip(self._sums, self._taps, strict=True):
            staged.add(outputs[index[output]])
        for total, output in zip(self._dense_sums, self._dense_sum_outputs, strict=True):
            total += outputs[index[output]]

    def result(self, targets: Sequence[Target]) -> dict[str, np.ndarray]:
        """Each target's cross-Gram matrix (summed over the taps that feed it, shared by targets of one input,
        as the Gram matrices are), and the dense segment closed."""
        self._session = None
        return self._per_target(targets, [s.value() for s in self._sums])

    def dense_sums(self, targets: Sequence[Target]) -> dict[str, np.ndarray]:
        """Each target's Σ x_dense over the rows of its cross-Gram matrix."""
        return self._per_target(targets, self._dense_sums)

    def _per_target(self, targets: Sequence[Target], arrays: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        reads: dict[str, list[int]] = {}
        for i, (tap, _) in enumerate(self._taps):
            for name in tap.targets:
                reads.setdefault(name, []).append(i)
        out = {}
        for t in targets:
            idx = reads.get(t.name, [])
            if idx:
                out[t.name] = sum((arrays[i] for i in idx[1:]), arrays[idx[0]])  # one tap: its array
        return out

    def release(self, pending: Iterable[str]) -> None:
        """Forget the dense tensors of pruned targets whose consumers will not run again (``pending``: the targets
        some segment still to run multiplies by), so that the dense weights held stay within about two groups."""
        keep = set(pending)
        for name in list(self.dense):
            if name not in keep and stored_tensor(self.values[name]) is not self.dense[name]:
                del self.dense[name], self.values[name]

    def drop(self, name: str) -> None:
        """Forget a boundary tensor no segment still to run reads."""
        self.store.drop(name)

    def close(self) -> None:
        self._session = None
        self.store.close()


def rows_matrix(
    b: TapBuilder, x: ir.Value, elem_type: int, axis: int, rank: int | None, k: int
) -> ir.Value | None:
    """``x`` as float32 ``[rows, K]`` (K: the channel ``axis``), or None when that needs an unknown rank."""
    if elem_type != onnx.TensorProto.FLOAT:  # fp16/bf16: multiply in float32, as the Gram taps do
        x = b.node("Cast", [x], "float32", to=onnx.TensorProto.FLOAT)
    return as_rows(b, x, axis, rank, k)
