"""How many units each group loses when one budget is shared across layers (FLAP's adaptive structure).

Pure numpy. FLAP standardises each layer's scores (``(s - mean) / std`` within the layer), then removes the units
below one global threshold, so a layer whose units matter less than the others' loses more. Here the threshold
is found greedily: units go in ascending standardised score until the parameters removed reach the budget, each
group's units in its own ascending order. Three constraints shape the greedy walk, all counted on the group's
*original* width (so rounds of an iterative shrink keep them):

* a floor and a cap on the fraction each group loses;
* ``multiple`` (one for all groups, or one per group): the units a group keeps stay a multiple of it (groups of
  ``multiple`` units or fewer stay whole), so units go in chunks whose price is the highest score in the chunk;
* at least one unit (one multiple) is always left.

Costs are parameters per unit, so groups of different sizes trade by what their units weigh: the budget is met
in parameters, within one chunk (the last chunk is taken when that lands nearer the budget).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np


def standardize(scores: np.ndarray) -> np.ndarray:
    """``(s - mean) / std`` within one group (all zeros when every unit scores the same)."""
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf, neginf=-1e300, posinf=1e300)
    std = float(np.std(s))
    if not np.isfinite(std) or std == 0.0:
        return np.zeros_like(s)
    return (s - float(np.mean(s))) / std


def _valid(original: int, removed: int, multiple: int) -> bool:
    """Whether ``original - removed`` units left is a count the group may keep."""
    left = original - removed
    return left >= multiple and left % multiple == 0


def allocate(
    scores: Sequence[np.ndarray],
    original: Sequence[int],
    cost: Sequence[float],
    budget: float,
    *,
    floor: float = 0.0,
    cap: float = 1.0,
    multiple: int | Sequence[int] = 1,
    standardised: bool = True,
) -> list[int]:
    """Units each group loses now, its current units scored by ``scores`` (standardised inside).

    ``original``: each group's width before any removal (its current width is ``len(scores[g])``, the rest went
    in earlier rounds); ``cost``: parameters per unit; ``budget``: parameters removed in all, earlier rounds
    included, once this call's removals are done. ``floor`` and ``cap`` bound each group's removed fraction of
    its original width. ``standardised=False`` compares the raw scores across groups (when they are on one scale,
    as the output errors of consumers that write the same residual stream are).
    """
    multiples = [multiple] * len(original) if isinstance(multiple, int) else list(multiple)
    z = [np.sort(standardize(s) if standardised else np.asarray(s, dtype=np.float64)) for s in scores]
    gone = [o - len(s) for o, s in zip(original, scores, strict=True)]
    total = list(gone)  # units removed so far, per group, counted on the original width
    spent = float(sum(g * c for g, c in zip(gone, cost, strict=True)))
    limit = []
    for i, o in enumerate(original):
        upper = max(t for t in range(0, o) if t == gone[i] or (t <= cap * o + 1e-9 and _valid(o, t, multiples[i])))
        limit.append(max(upper, gone[i]))
        floor_target = int(np.floor(floor * o + 0.5))
        while total[i] < min(floor_target, limit[i]):  # the floor first, in whole chunks
            step = _next(o, total[i], multiples[i])
            if step is None or step > limit[i]:
                break
            spent += (step - total[i]) * cost[i]
            total[i] = step

    heap: list[tuple[float, int, int]] = []

    def push(i: int) -> None:
        step = _next(original[i], total[i], multiples[i])
        if step is not None and step <= limit[i]:
            price = float(z[i][step - gone[i] - 1])  # the chunk's dearest unit
            heapq.heappush(heap, (price, i, step))

    for i in range(len(original)):
        push(i)
    while heap:
        _, i, step = heapq.heappop(heap)
        extra = (step - total[i]) * cost[i]
        if spent + extra / 2 > budget:  # taking it would land farther from the budget than leaving it
            break
        spent += extra
        total[i] = step
        push(i)
    return [t - g for t, g in zip(total, gone, strict=True)]


def _next(original: int, removed: int, multiple: int) -> int | None:
    """The next removal count after ``removed`` that leaves a valid number of units, or None."""
    for t in range(removed + 1, original):
        if _valid(original, t, multiple):
            return t
    return None
