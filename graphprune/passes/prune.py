"""The pruning pass: score every selected target, mask it, and write the zeros into the model in place."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np
import onnx

from graphprune.algorithms.layout import from_canonical, to_canonical
from graphprune.algorithms.masks import mask_from_scores, nm_mask
from graphprune.algorithms.pattern import NMPattern, Pattern, Scope, Unstructured
from graphprune.algorithms.scores import Method, magnitude_scores, wanda_scores
from graphprune.algorithms.sparsegpt import sparsegpt
from graphprune.errors import GraphpruneError
from graphprune.graph.selection import select_targets
from graphprune.graph.targets import Skip, Target, find_targets
from graphprune.graph.weights import StoredWeight, WeightStore

# Masks of N:M and per-output-neuron patterns are independent per row: score this many elements at a time, so
# the temporaries stay small next to the model even for the largest weights.
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how. ``include``/``exclude`` are shell-style patterns on weight or node names."""

    pattern: Pattern = field(default_factory=lambda: NMPattern(2, 4))
    method: Method = Method.MAGNITUDE
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    include_head: bool = False
    percdamp: float = 0.01  # SparseGPT's dampening, a fraction of the mean diagonal of XᵀX
    blocksize: int = 128  # SparseGPT's column block

    def solver_options(self) -> dict[str, float | int]:
        return {"percdamp": self.percdamp, "blocksize": self.blocksize}


@dataclass
class WeightReport:
    """One weight's line in the report: what was done to it, or why it was left alone."""

    name: str
    op: str
    shape: list[int] | None = None
    k_axis: int | None = None
    dtype: str | None = None
    method: str | None = None
    pattern: str | None = None
    sparsity: float | None = None  # fraction of zeros after pruning
    skipped: str | None = None  # the reason, for a weight left alone


@dataclass
class PruneResult:
    """What the pass did: one report per pruned or skipped weight."""

    config: PruneConfig
    weights: list[WeightReport]

    @property
    def pruned(self) -> list[WeightReport]:
        return [w for w in self.weights if w.skipped is None]

    @property
    def skipped(self) -> list[WeightReport]:
        return [w for w in self.weights if w.skipped is not None]

    @property
    def modified(self) -> bool:
        return bool(self.pruned)

    def achieved_sparsity(self) -> float:
        """Zeros over all pruned weights' elements."""
        total = sum(int(np.prod(w.shape or [0])) for w in self.pruned)
        zeros = sum((w.sparsity or 0.0) * int(np.prod(w.shape or [0])) for w in self.pruned)
        return zeros / total if total else 0.0

    def to_dict(self) -> dict:
        pattern = self.config.pattern
        return {
            "method": self.config.method.value,
            "pattern": str(pattern),
            "sparsity_requested": round(pattern.sparsity, 6),
            "scope": pattern.scope.value if isinstance(pattern, Unstructured) else "nm",
            "targets_found": len(self.weights),
            "pruned": len(self.pruned),
            "skipped": len(self.skipped),
            "sparsity_achieved": round(self.achieved_sparsity(), 6),
            "weights": [asdict(w) for w in self.weights],
        }


class Statistics(Protocol):
    """What calibration gives the scores: Σx² per input channel, and Gram matrices XᵀX for SparseGPT."""

    sumsq: Mapping[str, np.ndarray]
    gram: Mapping[str, np.ndarray]


class PrunePass:
    """Prune a model in place.

    ``stats`` feeds Wanda and SparseGPT: calibration statistics, or for Wanda alone a plain mapping of weight
    name -> Σx² per input channel (the weight's K axis).
    """

    in_place = True

    def __init__(
        self,
        config: PruneConfig,
        stats: Statistics | Mapping[str, np.ndarray] | None = None,
        on_weight: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.input_sumsq: Mapping[str, np.ndarray] | None = stats if isinstance(stats, Mapping) else None
        self.gram: Mapping[str, np.ndarray] = {}
        if stats is not None and not isinstance(stats, Mapping):
            self.input_sumsq, self.gram = stats.sumsq, stats.gram
        self.on_weight = on_weight

    def plan(self, model: onnx.ModelProto) -> tuple[list[Target], list[Skip]]:
        """The targets this pass will prune and the weights it will leave, without touching the model."""
        scan = find_targets(model, include_head=self.config.include_head)
        chosen = select_targets(scan, self.config.pattern, self.config.include, self.config.exclude)
        targets, skips = chosen.targets, chosen.skips
        if self.config.method is Method.SPARSEGPT:
            unfit = {t.name: _sparsegpt_unfit(t) for t in targets}
            skips = skips + [Skip(t.name, t.op, unfit[t.name]) for t in targets if unfit[t.name]]
            targets = [t for t in targets if not unfit[t.name]]
        return targets, skips

    def call(self, model: onnx.ModelProto) -> PruneResult:
        return self.run(model, *self.plan(model))

    def run(self, model: onnx.ModelProto, targets: list[Target], skips: list[Skip]) -> PruneResult:
        """Prune the targets of a :meth:`plan`; the result reports them and the skipped weights."""
        self.check_statistics(targets)
        reports = [WeightReport(s.name, s.op, skipped=s.reason) for s in skips]
        reports += self.prune_targets(model, targets)
        reports.sort(key=lambda r: (r.skipped is not None, r.name))
        return PruneResult(self.config, reports)

    def prune_targets(self, model: onnx.ModelProto, targets: list[Target]) -> list[WeightReport]:
        """Prune these planned targets in place (sequential calibration calls this group by group)."""
        store = WeightStore(model)
        reports = []
        for target in targets:
            stored = store.read(target)
            if self.config.method is Method.SPARSEGPT:
                self._reconstruct_weight(target, stored)
            else:
                self._prune_weight(target, stored)
            reports.append(self._report(target, stored))
            if self.on_weight:
                self.on_weight(target.name)
        return reports

    def _prune_weight(self, target: Target, stored: StoredWeight) -> None:
        effective = stored.effective()
        values = stored.values
        zero = stored.zero_value()
        pattern = self.config.pattern
        for rows in _row_chunks(target, pattern):
            chunk = effective[rows]
            if isinstance(pattern, NMPattern):  # groups along K in the stored layout: no transposed copies
                keep = nm_mask(self._scores(target, chunk, target.k_axis), pattern, axis=target.k_axis)
            else:
                canonical = to_canonical(chunk, target.k_axis, target.out_axis)
                mask = mask_from_scores(self._scores(target, canonical, -1), pattern)
                keep = from_canonical(mask, chunk.shape, target.k_axis, target.out_axis)
            np.copyto(values[rows], np.broadcast_to(zero, values.shape)[rows], where=~keep)
        stored.write(values)

    def _reconstruct_weight(self, target: Target, stored: StoredWeight) -> None:
        """SparseGPT: choose the mask and update the surviving weights from the Gram matrix of the inputs."""
        canonical = to_canonical(stored.values, target.k_axis, target.out_axis)[:, 0, :]
        updated = sparsegpt(canonical, self.gram[target.name], self.config.pattern, **self.config.solver_options())
        stored.write(from_canonical(updated[:, None, :], target.shape, target.k_axis, target.out_axis))

    def _scores(self, target: Target, weight: np.ndarray, k_axis: int) -> np.ndarray:
        if self.config.method is Method.MAGNITUDE:
            return magnitude_scores(weight)
        if self.config.method is Method.WANDA:
            assert self.input_sumsq is not None
            return wanda_scores(weight, self.input_sumsq[target.name], axis=k_axis)
        raise GraphpruneError(f"method {self.config.method.value} is not available in this pass")

    def check_statistics(self, targets: list[Target]) -> None:
        """Fail before any work when the method needs statistics that are missing or of another model."""
        method = self.config.method
        if method is Method.MAGNITUDE:
            return
        if self.input_sumsq is None:
            raise GraphpruneError(f"{method.value} needs activation statistics: pass --calib DATA or --stats FILE")
        if method is Method.SPARSEGPT:
            no_gram = [t.name for t in targets if t.name not in self.gram]
            if no_gram:
                raise GraphpruneError(
                    f"sparsegpt needs Gram matrices, and the statistics hold none for {len(no_gram)} weights "
                    f"(e.g. {no_gram[0]}): calibrate with --method sparsegpt"
                )
        stats = self.input_sumsq
        missing = [t.name for t in targets if t.name not in stats]
        wrong = [t.name for t in targets if t.name in stats and stats[t.name].shape != (t.k,)]
        if missing or wrong:
            names = ", ".join((missing + wrong)[:3])
            raise GraphpruneError(
                f"statistics don't match the model: {len(missing)} weights missing, {len(wrong)} with a "
                f"different K (e.g. {names}); calibrate this model again"
            )

    def _report(self, target: Target, stored: StoredWeight) -> WeightReport:
        effective = stored.effective()
        zeros = effective.size - int(np.count_nonzero(effective))
        return WeightReport(
            name=target.name,
            op=target.op,
            shape=list(target.shape),
            k_axis=target.k_axis,
            dtype=target.dtype,
            method=self.config.method.value,
            pattern=str(self.config.pattern),
            sparsity=round(zeros / effective.size, 6),
        )


def _sparsegpt_unfit(target: Target) -> str:
    """Why SparseGPT's update cannot be written into this weight ('' when it can)."""
    if "DequantizeLinear" in target.through:
        return "sparsegpt updates weights, which a quantized (DequantizeLinear) weight cannot store; use wanda"
    kernel = int(np.prod(target.shape)) // (target.shape[target.k_axis] * target.shape[target.out_axis])
    if kernel != 1:
        return "sparsegpt handles Conv with 1x1 kernels only; use wanda or magnitude for this weight"
    return ""


def _row_chunks(target: Target, pattern: Pattern) -> list[tuple[slice, ...]]:
    """Index tuples that split the stored weight along its output axis where the mask allows it."""
    everything = tuple(slice(None) for _ in target.shape)
    if isinstance(pattern, Unstructured) and pattern.scope is not Scope.OUTPUT:
        return [everything]
    out = target.shape[target.out_axis]
    per_row = int(np.prod(target.shape)) // max(out, 1)
    step = max(1, _CHUNK_ELEMENTS // max(per_row, 1))
    chunks = []
    for start in range(0, out, step):
        index = list(everything)
        index[target.out_axis] = slice(start, start + step)
        chunks.append(tuple(index))
    return chunks
