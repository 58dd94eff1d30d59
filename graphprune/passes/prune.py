"""The pruning pass: score every selected target, mask it, and write the zeros into the onnx-ir model in place."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, asdict, dataclass, field
from typing import Any, cast

import numpy as np
import onnx_ir as ir

from graphprune.algorithms.alps import PreparedGram, alps_solve_shared
from graphprune.algorithms.dense_target import blended_cross
from graphprune.algorithms.gptq import prune_and_quantize
from graphprune.algorithms.layout import from_canonical, to_canonical
from graphprune.algorithms.masks import mask_from_scores, nm_mask
from graphprune.algorithms.pattern import NMPattern, Pattern, Scope, Unstructured
from graphprune.algorithms.quant_grid import QuantGrid, dequantize_codes
from graphprune.algorithms.scores import Method, magnitude_scores, wanda_scores
from graphprune.algorithms.sparsegpt import sparsegpt
from graphprune.algorithms.swaps import swap_refine
from graphprune.calibration.stats import ActivationStats
from graphprune.errors import GraphpruneError
from graphprune.graph.selection import select_targets
from graphprune.graph.stored import replace_tensor, stored_tensor, stored_values
from graphprune.graph.targets import Skip, Target, find_targets
from graphprune.graph.weights import StoredWeight, read_weight
from graphprune.passes.base import (
    GRID_CODES,
    PERMUTATION_REPORT,
    PassPostconditionError,
    PassPreconditionError,
    StatisticsInput,
    describe_statistics,
    gram_in_model_order,
    statistics_parts,
    sumsq_in_model_order,
)
from graphprune.passes.check import CheckPass
from graphprune.passes.permute import ChannelGroups, PermutePass, channel_groups

# Masks of N:M and per-output-neuron patterns are independent per row: score this many elements at a time, so
# the temporaries stay small next to the model even for the largest weights.
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how. ``include``/``exclude`` are shell-style patterns on weight or node names."""

    pattern: Pattern = field(default_factory=lambda: NMPattern(2, 4))
    _: KW_ONLY  # the rest by keyword
    method: Method = Method.MAGNITUDE
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    include_head: bool = False
    percdamp: float = 0.01  # SparseGPT's and ALPS's dampening, a fraction of the mean diagonal of XᵀX
    blocksize: int = 128  # SparseGPT's column block
    permute: bool = False  # N:M: reorder channels where the graph absorbs it exactly (passes/permute.py)
    # SparseGPT/ALPS joint mode: the kept weights land on this grid (algorithms/gptq.py); the pass writes their
    # float values and records the codes and scales (``GRID_CODES``) for the Q/DQ writer (quantize/joint.py)
    quantize: QuantGrid | None = None
    target: str = "pruned"  # SparseGPT/ALPS reconstruct the pruned model's outputs, or "dense": the dense model's
    swaps: int = 0  # SparseGPT/ALPS: mask refinement by swaps after the solver, at most this many per row
    target_blend: float = 1.0  # dense targets: the dense outputs' share of the target (algorithms/dense_target.py)

    def __post_init__(self) -> None:  # options fail before any calibration, not after it
        if not (math.isfinite(self.percdamp) and self.percdamp >= 0):
            raise GraphpruneError(f"`percdamp` must be a finite number >= 0, got {self.percdamp}")
        if self.blocksize < 1:
            raise GraphpruneError(f"`blocksize` must be at least 1, got {self.blocksize}")
        if self.quantize is not None and not self.method.reconstructs:
            raise GraphpruneError(f"`quantize` is a joint mode of sparsegpt and alps, not of {self.method.value}")
        check_reconstruction_options(self)

    def solver_options(self) -> dict[str, Any]:  # percdamp (float) and blocksize (int) as keywords
        return {"percdamp": self.percdamp, "blocksize": self.blocksize}


@dataclass(kw_only=True)
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
    permutation: dict | None = None  # the channel permutation written before pruning this weight (its K)


@dataclass
class PruneResult(ir.passes.PassResult):
    """What the pass did (``model``, ``modified``, as every onnx-ir pass) and one report per weight."""

    config: PruneConfig = field(default_factory=PruneConfig)
    weights: list[WeightReport] = field(default_factory=list)
    qdq: dict | None = None  # the joint mode's Q/DQ step, when a driver wrote one (quantize/joint.py)

    @property
    def pruned(self) -> list[WeightReport]:
        return [w for w in self.weights if w.skipped is None]

    @property
    def skipped(self) -> list[WeightReport]:
        return [w for w in self.weights if w.skipped is not None]

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
            "permuted_groups": [w.permutation for w in self.weights if w.permutation],
            # the joint mode's grid, and what its Q/DQ step wrote
            "quantize": self.config.quantize.to_dict() if self.config.quantize else None,
            "weights": [asdict(w) for w in self.weights],
            **({"qdq": self.qdq} if self.qdq is not None else {}),
        }


Plan = tuple[list[Target], list[Skip]]


def prune_result(model: ir.Model, config: PruneConfig, plan: Plan, reports: list[WeightReport]) -> PruneResult:
    """The result of any pruning run (one-shot, sequential, segment-wise): the reports of the pruned targets
    and of the plan's skipped weights, pruned first, each part by name."""
    targets, skips = plan
    everything = [WeightReport(name=s.name, op=s.op, skipped=s.reason) for s in skips] + reports
    everything.sort(key=lambda r: (r.skipped is not None, r.name))
    return PruneResult(model, bool(targets), config, everything)


class PrunePass(ir.passes.InPlacePass):
    """Prune a model in place: ``PrunePass(config=config, stats=stats)(model)`` returns a :class:`PruneResult`.

    ``stats`` feeds Wanda and SparseGPT: calibration statistics, or for Wanda alone a plain mapping of weight
    name -> Σx² per input channel (the weight's K axis). ``plan`` is a :meth:`plan` the caller already made.
    Pre-condition: the method's statistics are there and match the targets. Post-condition: every pruned
    weight holds the N:M pattern along its K axis.

    With ``config.permute`` each weight that reads a channel group is given its best channel order first, by a
    :class:`~graphprune.passes.permute.PermutePass` run just before the weight is pruned (``groups``: the
    graph's channel groups when the caller already has them). Composing ``PermutePass`` and ``PrunePass`` in an
    ``ir.passes.Sequential`` does the same with every order chosen before any weight is pruned.

    With ``defer=True`` nothing is computed yet: each target's tensor becomes an ``ir.LazyTensor`` that reads,
    prunes and checks the weight when it is written (``save_model`` writes one tensor at a time), so a model
    with external data is pruned with one weight in memory at a time; the reports' sparsities are filled in
    as the weights are written, and the post-condition is checked per weight at that moment. ``on_weight`` is
    then called as each weight is written (from the writer's threads, one call at a time).

    The pass holds its configuration only: what a run computes lives in a :class:`_PruneRun` made by
    :meth:`call`, so one instance prunes any number of models alike.
    """

    def __init__(
        self,
        *,
        config: PruneConfig | None = None,
        stats: StatisticsInput = None,
        plan: Plan | None = None,
        groups: ChannelGroups | None = None,
        defer: bool = False,
        on_weight: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__()
        self.config = config if config is not None else PruneConfig()
        self.stats = stats
        self.given_plan = plan
        self.groups = groups
        self.defer = defer
        self.on_weight = on_weight

    def __repr__(self) -> str:
        plan = "" if self.given_plan is None else f", plan=<{len(self.given_plan[0])} targets>"
        defer = ", defer=True" if self.defer else ""
        return f"PrunePass(config={self.config!r}, stats={describe_statistics(self.stats)}{plan}{defer})"

    def plan(self, model: ir.Model) -> Plan:
        """The targets this pass will prune and the weights it will leave, without touching the model."""
        scan = find_targets(model, include_head=self.config.include_head)
        chosen = select_targets(scan, self.config.pattern, self.config.include, self.config.exclude)
        targets, skips = chosen.targets, chosen.skips
        unfit = {t.name: self._unfit(t) for t in targets}
        skips = skips + [Skip(t.name, t.op, unfit[t.name]) for t in targets if unfit[t.name]]
        return [t for t in targets if not unfit[t.name]], skips

    def _unfit(self, target: Target) -> str:
        """Why this method cannot prune this target ('' when it can)."""
        if self.config.method is not Method.MAGNITUDE and any(c.in_subgraph for c in target.consumers):
            return (
                "read inside an If/Loop/Scan body, where calibration cannot measure its inputs; "
                "use `method=magnitude`"
            )
        if self.config.method.reconstructs:
            return _reconstruction_unfit(target, self.config.method)
        return ""

    def requires(self, model: ir.Model) -> None:
        if self.config.method is not Method.MAGNITUDE and statistics_parts(self.stats)[0] is None:
            raise PassPreconditionError(
                f"{self.config.method.value} needs activation statistics: pass `calib` data or a `stats` file"
            )

    def __call__(self, model_or_result: ir.Model | ir.passes.PassResult, /) -> PruneResult:
        # this pass's own result type (onnx-ir types it as a plain PassResult)
        return cast(PruneResult, super().__call__(model_or_result))

    def call(self, model: ir.Model) -> PruneResult:
        targets, skips = self.given_plan or self.plan(model)
        _check_statistics(self.config.method, self.stats, targets)  # a mismatch fails before any weight changes
        if self.config.target == "dense" and targets and not getattr(self.stats, "cross", None):
            raise PassPreconditionError("dense targets need the cross-Gram matrices of a sequential calibration")
        run = _PruneRun(self.config, model, self.stats, self.defer, self.on_weight)
        return prune_result(model, self.config, (targets, skips), run.prune(targets, self._permutation(model)))

    def ensures(self, model: ir.Model) -> None:
        pattern = self.config.pattern
        if self.defer or not isinstance(pattern, NMPattern):
            return  # deferred weights are checked one by one as they are written
        targets, _ = self.given_plan or self.plan(model)  # pruning changes values, not what the plan reads
        check = CheckPass(pattern, targets=targets)(model)
        if check.violations:  # not ``ok``, which also fails a check of no weight: pruning nothing is no breach
            bad = check.violations[0]
            raise PassPostconditionError(
                f"weight {bad.name} breaks {pattern} along K after pruning: {bad.bad_groups} groups, "
                f"the first at {bad.first_bad}"
            )

    def _permutation(self, model: ir.Model) -> Callable[[Target], None] | None:
        """With ``config.permute``: a step that writes the channel order of the group a target reads (if any)."""
        pattern = self.config.pattern
        if not self.config.permute or not isinstance(pattern, NMPattern):
            return None
        groups = self.groups if self.groups is not None else channel_groups(model)

        def permute(target: Target) -> None:
            if target.name in groups[0]:
                step = PermutePass(
                    pattern=pattern,
                    method=self.config.method,
                    stats=self.stats,
                    readers=[target.name],
                    groups=groups,
                )
                step(model)

        return permute


class _PruneRun:
    """One run of :class:`PrunePass` on one model: the model's stored values, the statistics in the model's
    channel order, ALPS's weights solved together, the callback's lock."""

    def __init__(
        self,
        config: PruneConfig,
        model: ir.Model,
        stats: StatisticsInput,
        defer: bool,
        on_weight: Callable[[str], None] | None,
    ) -> None:
        self.config = config
        self.stored = stored_values(model.graph)
        self.sumsq, self.gram = statistics_parts(stats)
        self.cross: Mapping[str, np.ndarray] = getattr(stats, "cross", None) or {}  # dense targets' cross-Grams
        self.defer = defer
        self.on_weight = on_weight
        self.callback_lock = threading.Lock()
        self.prepared: tuple[np.ndarray, PreparedGram] | None = None  # ALPS: the last Gram matrix, prepared
        self.alps = _SharedInputSolves()  # ALPS: weights solved with an earlier one that reads the same input

    def prune(self, targets: list[Target], permute: Callable[[Target], None] | None) -> list[WeightReport]:
        """Prune the planned targets in order (ALPS: those sharing an input next to each other)."""
        reports = []
        targets = self._by_gram(targets)
        self.alps.peers = targets
        for target in targets:
            if permute is not None:
                permute(target)
            if self.defer:
                reports.append(self._defer(target))
            else:
                weight = read_weight(self.stored, target)
                weight.write(self._pruned_values(target, weight))
                reports.append(self._report(target, weight))
                if self.on_weight:
                    self.on_weight(target.name)
            reports[-1].permutation = self.stored[target.name].meta.get(PERMUTATION_REPORT)
        return reports

    def sumsq_of(self, target: Target) -> np.ndarray:
        assert self.sumsq is not None
        return sumsq_in_model_order(self.stored[target.name], self.sumsq[target.name])

    def cross_of(self, target: Target) -> np.ndarray | None:
        """Dense targets: Σ x_denseᵀ x of the target's input (sequential runs), in the model's channel order."""
        cross = self.cross.get(target.name)
        if cross is None:
            return None
        cross = gram_in_model_order(self.stored[target.name], cross)
        if self.config.target_blend == 1.0:
            return cross
        gram = self.gram_of(target)
        assert gram is not None  # a sequential calibration collects both
        return blended_cross(cross, gram, self.config.target_blend)  # the tempered target a C + (1 - a) H

    def gram_of(self, target: Target) -> np.ndarray | None:
        """The Gram matrix of the target's input in the model's channel order (the statistics' own array, shared
        by the weights that read the same input, where no permutation reordered the target)."""
        gram = self.gram.get(target.name)
        return None if gram is None else gram_in_model_order(self.stored[target.name], gram)

    def _defer(self, target: Target) -> WeightReport:
        """Replace the target's tensor by one that prunes the weight when read (see the class docstring)."""
        stored = self.stored
        source = stored_tensor(stored[target.name])
        report = self._report_line(target)

        def pruned() -> ir.TensorProtocol:
            weight = read_weight(stored, target, source)
            values = self._pruned_values(target, weight)
            weight.values = values
            nonzero = weight.effective() != 0
            report.sparsity = round(1.0 - int(np.count_nonzero(nonzero)) / nonzero.size, 6)
            pattern = self.config.pattern
            if isinstance(pattern, NMPattern) and _groups_over(nonzero, target.k_axis, pattern):
                raise PassPostconditionError(f"weight {target.name} breaks {pattern} along K after pruning")
            if self.on_weight:
                with self.callback_lock:  # the model's writer may evaluate two weights at once
                    self.on_weight(target.name)
            return weight.tensor(values)

        self.alps.sources[target.name] = source  # a peer solved with an earlier weight reads its dense values
        shape = ir.Shape(source.shape.numpy())  # LazyTensor takes a concrete ir.Shape
        replace_tensor(stored[target.name], ir.LazyTensor(pruned, source.dtype, shape, name=source.name))
        return report

    def _pruned_values(self, target: Target, stored: StoredWeight) -> np.ndarray:
        if self.config.method.reconstructs:
            return self._reconstruct_weight(target, stored)
        return self._prune_weight(target, stored)

    def _prune_weight(self, target: Target, stored: StoredWeight) -> np.ndarray:
        effective = stored.effective()
        values = stored.values
        zero = stored.zero_value()
        pattern = self.config.pattern
        for rows in _row_chunks(target, pattern):
            chunk = effective[rows]
            k_range = rows[target.k_axis]  # a chunk may cover part of K: its statistics are that part
            if isinstance(pattern, NMPattern):  # groups along K in the stored layout: no transposed copies
                keep = nm_mask(self._scores(target, chunk, target.k_axis, k_range), pattern, axis=target.k_axis)
            else:
                canonical = to_canonical(chunk, target.k_axis, target.out_axis)
                mask = mask_from_scores(self._scores(target, canonical, -1, k_range), pattern)
                keep = from_canonical(mask, chunk.shape, target.k_axis, target.out_axis)
            _clear(values[rows], keep, np.broadcast_to(zero, values.shape)[rows])
        return values

    def _reconstruct_weight(self, target: Target, stored: StoredWeight) -> np.ndarray:
        """SparseGPT or ALPS: choose the mask and update the kept weights from the Gram matrix of the inputs.

        The solvers are chosen here: an option that changes how a weight is reconstructed (what it is solved
        against, what grid its values land on) is a :class:`PruneConfig` field read in this method and its
        solvers' options, so every driver (one-shot, sequential, segment-wise) gets it through the pass.
        """
        canonical = _canonical(target, stored)
        if not np.isfinite(canonical).all():
            raise GraphpruneError(
                f"weight {target.name} holds NaN or infinite values: {self.config.method.value} cannot prune it"
            )
        gram, cross = self.gram_of(target), self.cross_of(target)
        assert gram is not None  # checked with the statistics
        grid = self.config.quantize
        try:
            if self.config.method is Method.ALPS:
                updated = self._alps_weight(target, canonical, gram, cross)
            elif grid is not None:  # SparseGPT's joint mode: each column's kept weights rounded as it prunes
                options = self.config.solver_options()
                solved = prune_and_quantize(canonical, gram, self.config.pattern, grid, **options)
                updated = self._on_grid(target, solved, canonical.dtype)
            else:
                updated = sparsegpt(
                    canonical, gram, self.config.pattern, **self.config.solver_options(), cross=cross
                )
            if self.config.swaps:
                pattern, budget, damp = self.config.pattern, self.config.swaps, self.config.percdamp
                updated = swap_refine(canonical, updated, gram, pattern, budget, damp, cross).weight
            if grid is not None and self.config.method is Method.ALPS:  # GPTQ under ALPS's (final) mask
                solved = prune_and_quantize(updated, gram, None, grid, **self.config.solver_options())
                updated = self._on_grid(target, solved, canonical.dtype)
        except ValueError as exc:  # the solver's word on this weight's data (e.g. a Gram that is not definite)
            raise GraphpruneError(f"{self.config.method.value} cannot prune {target.name}: {exc}") from None
        return from_canonical(updated[:, None, :], target.shape, target.k_axis, target.out_axis)

    def _on_grid(self, target: Target, solved: tuple[np.ndarray, np.ndarray], dtype: np.dtype) -> np.ndarray:
        """The joint mode's weights as float values ``code · scale`` (float32, as DequantizeLinear computes them,
        then the weight's dtype); the codes and scales are recorded on the weight's value for the Q/DQ writer."""
        assert self.config.quantize is not None
        self.stored[target.name].meta[GRID_CODES] = solved
        return dequantize_codes(*solved, self.config.quantize).astype(dtype, copy=False)

    def _alps_weight(
        self, target: Target, canonical: np.ndarray, gram: np.ndarray, cross: np.ndarray | None = None
    ) -> np.ndarray:
        """ALPS on one weight, solved together with the planned weights not pruned yet that read the same input
        (Q/K/V, gate/up: :func:`alps_solve_shared`); their results wait here for their turn."""
        shared = self.alps
        with shared.lock:  # the model's writer may evaluate two deferred weights at once
            waiting = shared.solved.pop(target.name, None)
            shared.done.add(target.name)
            if waiting is not None and np.array_equal(waiting[0], canonical):  # unchanged since (no permutation)
                return waiting[1]
            if self.prepared is None or self.prepared[0] is not gram:
                self.prepared = (gram, PreparedGram(gram, self.config.percdamp))
            peers = self._alps_peers(gram)
            weights = [canonical, *(w for _, w in peers)]
            results = alps_solve_shared(weights, self.prepared[1], self.config.pattern, cross=cross)
            for (t, w), result in zip(peers, results[1:], strict=True):
                shared.solved[t.name] = (w, result.weight)
            return results[0].weight

    def _alps_peers(self, gram: np.ndarray) -> list[tuple[Target, np.ndarray]]:
        """The planned weights not pruned yet that read this Gram matrix's input, with their dense values."""
        shared, peers = self.alps, []
        for t in shared.peers:
            if t.name in shared.done or self.gram_of(t) is not gram:
                continue
            if self.defer and t.name not in shared.sources:  # not deferred yet: its tensor is still the model's
                continue
            w = _canonical(t, read_weight(self.stored, t, shared.sources.get(t.name)))
            if np.isfinite(w).all():  # a bad peer fails at its own turn, under its own name
                peers.append((t, w))
        return peers

    def _by_gram(self, targets: list[Target]) -> list[Target]:
        """ALPS: the weights that share a Gram matrix one after another, so that one preparation serves them."""
        if self.config.method is not Method.ALPS:
            return targets
        first: dict[int, int] = {}
        for i, t in enumerate(targets):
            first.setdefault(id(self.gram.get(t.name)), i)
        return sorted(targets, key=lambda t: first[id(self.gram.get(t.name))])

    def _scores(self, target: Target, weight: np.ndarray, k_axis: int, k_range: slice = slice(None)) -> np.ndarray:
        """Scores of ``weight``, the part ``k_range`` of the target's K (a chunk of a large weight)."""
        if self.config.method is Method.MAGNITUDE:
            return magnitude_scores(weight)
        if self.config.method is Method.WANDA:
            return wanda_scores(weight, self.sumsq_of(target)[k_range], axis=k_axis)
        raise GraphpruneError(f"method {self.config.method.value} is not available in this pass")

    def _report(self, target: Target, stored: StoredWeight) -> WeightReport:
        effective = stored.effective()
        zeros = effective.size - int(np.count_nonzero(effective))
        report = self._report_line(target)
        report.sparsity = round(zeros / effective.size, 6)
        return report

    def _report_line(self, target: Target) -> WeightReport:
        """A pruned target's line in the report, its sparsity still unset."""
        return WeightReport(
            name=target.name,
            op=target.op,
            shape=list(target.shape),
            k_axis=target.k_axis,
            dtype=target.dtype,
            method=self.config.method.value,
            pattern=str(self.config.pattern),
        )


def _check_statistics(method: Method, stats: StatisticsInput, targets: list[Target]) -> None:
    """Fail before any work when the method needs statistics that are missing or of another model."""
    if method is Method.MAGNITUDE:
        return
    sumsq, gram = statistics_parts(stats)
    if sumsq is None:
        raise PassPreconditionError(
            f"{method.value} needs activation statistics: pass `calib` data or a `stats` file"
        )
    ActivationStats.from_sumsq(sumsq, targets, gram).check(targets, gram=method.reconstructs)  # the one check


@dataclass(kw_only=True)
class _SharedInputSolves:
    """ALPS's bookkeeping for weights solved together: the run's targets in order (``peers``), the dense
    tensors of deferred weights, the names already pruned, and results waiting (keyed by name: the canonical
    weight they were solved from, the solution)."""

    peers: list[Target] = field(default_factory=list)
    sources: dict[str, ir.TensorProtocol] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)
    solved: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _canonical(target: Target, stored: StoredWeight) -> np.ndarray:
    """The stored weight in the solvers' ``(out, K)`` layout."""
    return to_canonical(stored.values, target.k_axis, target.out_axis)[:, 0, :]


def check_reconstruction_options(config: PruneConfig) -> None:
    """Dense targets and swaps refine SparseGPT's and ALPS's reconstruction; refuse them elsewhere."""
    if config.target not in ("pruned", "dense"):
        raise GraphpruneError(f"the reconstruction target must be 'pruned' or 'dense', got {config.target!r}")
    blend = config.target_blend
    if not (math.isfinite(blend) and 0.0 <= blend <= 1.0):
        raise GraphpruneError(f"`target_blend` must be a number in [0, 1], got {blend}")
    if blend != 1.0 and config.target != "dense":
        raise GraphpruneError("`target_blend` tempers dense targets: it needs `target` 'dense'")
    if config.swaps < 0:
        raise GraphpruneError(f"the swap budget must be >= 0, got {config.swaps}")
    if (config.target == "dense" or config.swaps) and not config.method.reconstructs:
        raise GraphpruneError("dense targets and swaps refine sparsegpt and alps: choose one of those methods")
    if config.swaps and isinstance(config.pattern, Unstructured) and config.pattern.scope is Scope.INPUT:
        raise GraphpruneError("swaps keep each output row's count: they do not refine a mask compared per input")
    refines = config.target == "dense" or config.swaps
    if config.quantize is not None and config.method is Method.SPARSEGPT and refines:
        raise GraphpruneError("sparsegpt's joint quantization takes neither dense targets nor swaps; use alps")
    if config.target == "dense" and config.permute:
        raise GraphpruneError("dense targets and channel permutation cannot be combined yet")


def _reconstruction_unfit(target: Target, method: Method) -> str:
    """Why SparseGPT's or ALPS's update cannot be written into this weight ('' when it can)."""
    if "DequantizeLinear" in target.through:
        return (
            f"{method.value} updates weights, which a quantized (DequantizeLinear) weight cannot store; use wanda"
        )
    kernel = int(np.prod(target.shape)) // (target.shape[target.k_axis] * target.shape[target.out_axis])
    if kernel != 1:
        return f"{method.value} handles Conv with 1x1 kernels only; use wanda or magnitude for this weight"
    return ""


def _clear(values: np.ndarray, keep: np.ndarray, zero: np.ndarray) -> None:
    """Set ``values`` to ``zero`` where ``keep`` is False, in place.

    A zero whose bits are all 0 (+0.0, or an integer 0) is written by AND-ing every value with a mask of all-one
    or all-zero bits: the same bytes as a masked copy, and several times faster on large weights.
    """
    if zero.strides == (0,) * zero.ndim and not zero.flat[0] and values.dtype.itemsize in (1, 2, 4, 8):
        size = values.dtype.itemsize
        bits = np.negative(keep.view(np.uint8), dtype=np.dtype(f"i{size}")).view(np.dtype(f"u{size}"))
        view = values.view(np.dtype(f"u{size}"))
        np.bitwise_and(view, bits, out=view)
    else:
        np.copyto(values, zero, where=~keep)


def _groups_over(nonzero: np.ndarray, k_axis: int, pattern: NMPattern) -> int:
    """Groups of ``pattern.group`` along K holding more than ``pattern.keep`` non-zeros, counted in the stored
    layout (no transposed copy: this runs on every weight a streaming apply writes)."""
    shape = nonzero.shape
    grouped = nonzero.reshape(*shape[:k_axis], shape[k_axis] // pattern.group, pattern.group, *shape[k_axis + 1 :])
    counter = np.uint8 if pattern.group < 256 else np.uint32  # a narrow sum is fast; M > 255 needs more bits
    return int(np.count_nonzero(np.add.reduce(grouped, axis=k_axis + 1, dtype=counter) > pattern.keep))


def _row_chunks(target: Target, pattern: Pattern) -> list[tuple[slice, ...]]:
    """Index tuples that split the stored weight into independent pieces for the mask.

    An N:M mask allows any split along the output axis, or along K at group boundaries; the first stored axis
    is chosen when it is one of those, so every chunk is contiguous in memory. Per-output-neuron masks split
    along the output axis.
    """
    everything = tuple(slice(None) for _ in target.shape)
    if isinstance(pattern, Unstructured) and pattern.scope is not Scope.OUTPUT:
        return [everything]
    axis, align = target.out_axis, 1
    if isinstance(pattern, NMPattern) and 0 in (target.k_axis, target.out_axis):
        axis, align = 0, (pattern.group if target.k_axis == 0 else 1)
    length = target.shape[axis]
    per_row = int(np.prod(target.shape)) // max(length, 1)
    step = max(align, _CHUNK_ELEMENTS // max(per_row, 1) // align * align)
    chunks = []
    for start in range(0, length, step):
        index = list(everything)
        index[axis] = slice(start, start + step)
        chunks.append(tuple(index))
    return chunks
