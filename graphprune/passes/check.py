"""The check pass: prove that every selected target holds its N:M pattern along its K axis.

Float weights, weights behind DequantizeLinear (int8, uint8, fp8, int4 packed: a weight is zero where its code is
its zero point) and the weights of ONNX Runtime's quantized operators (MatMulInteger, QLinearMatMul, MatMulNBits)
are all read. A check that verified no weight at all does not pass: it proved nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import onnx_ir as ir

from graphprune.algorithms.layout import to_canonical
from graphprune.algorithms.masks import nm_violations
from graphprune.algorithms.pattern import NMPattern
from graphprune.graph.selection import select_targets
from graphprune.graph.stored import stored_values
from graphprune.graph.targets import QUANTIZED_OPERATORS, Skip, Target, TargetScan, find_targets, operator_targets
from graphprune.graph.weights import read_weight
from graphprune.quantize.operators import operator_weight


@dataclass(frozen=True, kw_only=True)
class WeightCheck:
    """One target's verdict: its zeros, and the groups along K that hold too many non-zeros."""

    name: str
    op: str
    k_axis: int
    sparsity: float
    bad_groups: int
    total_groups: int
    first_bad: tuple[int, ...] | None  # stored index of the first weight of the first bad group

    @property
    def ok(self) -> bool:
        return self.bad_groups == 0


@dataclass
class CheckResult(ir.passes.PassResult):
    """The verdict per target (``model`` is the checked model, ``modified`` always False)."""

    pattern: NMPattern = field(default_factory=lambda: NMPattern(2, 4))
    weights: list[WeightCheck] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)

    @property
    def violations(self) -> list[WeightCheck]:
        return [w for w in self.weights if not w.ok]

    @property
    def ok(self) -> bool:
        return bool(self.weights) and not self.violations


class CheckPass(ir.passes.InPlacePass):
    """Verify, without changing anything, that the selected targets follow ``pattern`` along K.

    An analysis: it returns the model it was given, unmodified, with the verdicts. ``targets`` checks exactly
    these (a pruning pass's post-condition) instead of the ones found and selected in the model.
    """

    def __init__(
        self,
        pattern: NMPattern,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        include_head: bool = False,
        targets: Sequence[Target] | None = None,
    ) -> None:
        super().__init__()
        self.pattern = pattern
        self.include = include
        self.exclude = exclude
        self.include_head = include_head
        self.targets = targets

    def __call__(self, model_or_result: ir.Model | ir.passes.PassResult, /) -> CheckResult:
        # this pass's own result type (onnx-ir types it as a plain PassResult)
        return cast(CheckResult, super().__call__(model_or_result))

    def call(self, model: ir.Model) -> CheckResult:
        if self.targets is not None:
            targets, skips = list(self.targets), []
        else:
            scan = find_targets(model, include_head=self.include_head)
            operators = operator_targets(model, include_head=self.include_head)
            held = {t.name for t in operators.targets}  # find_targets calls them "not handled": they are read
            scan = TargetScan(scan.targets, [s for s in scan.skips if s.name not in held] + operators.skips)
            chosen = select_targets(scan, self.pattern, self.include, self.exclude)
            extra = select_targets(TargetScan(operators.targets, []), self.pattern, self.include, self.exclude)
            targets, skips = chosen.targets + extra.targets, chosen.skips + extra.skips
        stored = stored_values(model.graph)
        checks = [self._check(t, _effective(stored, t)) for t in targets]
        return CheckResult(model, False, self.pattern, checks, skips)

    def _check(self, target: Target, weight: np.ndarray) -> WeightCheck:
        canonical = to_canonical(weight, target.k_axis, target.out_axis)
        bad = nm_violations(canonical, self.pattern)
        first = None
        if bad.size:
            flat_in_canonical = int(bad[0]) * self.pattern.group
            first = _stored_index(target, canonical.shape, flat_in_canonical)
        return WeightCheck(
            name=target.name,
            op=target.op,
            k_axis=target.k_axis,
            sparsity=round(1.0 - np.count_nonzero(weight) / weight.size, 6),
            bad_groups=int(bad.size),
            total_groups=canonical.size // self.pattern.group,
            first_bad=first,
        )


def _effective(stored: dict[str, ir.Value], target: Target) -> np.ndarray:
    if target.op in QUANTIZED_OPERATORS:
        return operator_weight(stored, target)
    return read_weight(stored, target).effective()


def _stored_index(target: Target, canonical_shape: tuple[int, ...], flat: int) -> tuple[int, ...]:
    """Map a flat index of the canonical ``(out, R, K)`` array back to the stored tensor's coordinates."""
    out_i, r_i, k_i = np.unravel_index(flat, canonical_shape)
    rest_axes = [a for a in range(len(target.shape)) if a not in (target.k_axis, target.out_axis)]
    rest = np.unravel_index(r_i, [target.shape[a] for a in rest_axes]) if rest_axes else ()
    index = [0] * len(target.shape)
    index[target.out_axis] = int(out_i)
    index[target.k_axis] = int(k_i)
    for axis, value in zip(rest_axes, rest, strict=True):
        index[axis] = int(value)
    return tuple(index)
