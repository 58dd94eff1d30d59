"""Global allocation (FLAP's adaptive structure): one budget per unit kind, shared on standardised scores."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_ir as ir
import pytest

from graphprune.algorithms.allocation import allocate, standardize
from graphprune.algorithms.structured import StructuredMethod
from graphprune.calibration.request import CalibrationRequest
from graphprune.errors import GraphpruneError
from graphprune.pipeline.shrink import ShrinkConfig, shrink_model
from tests.onnx_builders import draw, residual_stack


def _scores(rng: np.random.Generator, widths: list[int]) -> list[np.ndarray]:
    # each group on its own scale: standardising is what makes them comparable
    return [rng.gamma(2.0, size=n) * 10.0**i for i, n in enumerate(widths)]


def test_without_bounds_the_lowest_standardised_units_of_all_groups_go() -> None:
    rng = np.random.default_rng(5600)  # this function's own data, whatever ran before
    widths = [40, 40, 40, 40]
    scores = _scores(rng, widths)
    counts = allocate(scores, widths, [3.0] * 4, budget=0.3 * 160 * 3.0)
    z = np.concatenate([standardize(s) for s in scores])
    owner = np.repeat(np.arange(4), widths)
    chosen = owner[np.argsort(z, kind="stable")[:48]]
    assert counts == np.bincount(chosen, minlength=4).tolist()
    np.testing.assert_allclose(standardize(scores[2]).std(), 1.0)


def test_floor_cap_and_multiple_are_respected_and_the_budget_is_met() -> None:
    rng = np.random.default_rng(5601)  # this function's own data, whatever ran before
    widths = [64, 64, 48, 64, 32]
    cost = [2.0, 2.0, 3.0, 2.0, 4.0]
    budget = 0.25 * sum(c * w for c, w in zip(cost, widths, strict=True))
    counts = allocate(_scores(rng, widths), widths, cost, budget, floor=0.1, cap=0.5, multiple=8)
    for n, w in zip(counts, widths, strict=True):
        assert 0.1 * w - 4 <= n <= 0.5 * w  # the floor to the nearest multiple, the cap exactly
        assert (w - n) % 8 == 0 and w - n >= 8
    spent = sum(n * c for n, c in zip(counts, cost, strict=True))
    assert abs(spent - budget) <= 8 * max(cost) / 2  # within half of the largest chunk


def test_rounds_continue_from_what_earlier_rounds_removed() -> None:
    rng = np.random.default_rng(5602)  # this function's own data, whatever ran before
    widths = [32, 32, 32]
    first = allocate(_scores(rng, widths), widths, [1.0] * 3, budget=12.0, cap=0.5)
    assert sum(first) == 12
    now = [np.ones(w - n) for w, n in zip(widths, first, strict=True)]  # the survivors, all alike
    second = allocate(now, widths, [1.0] * 3, budget=24.0, cap=0.5)
    assert sum(second) == 12
    assert all(a + b <= 16 for a, b in zip(first, second, strict=True))


def test_small_groups_stay_whole_and_equal_scores_do_not_fail() -> None:
    counts = allocate([np.ones(6), np.ones(40)], [6, 40], [1.0, 1.0], budget=10.0, multiple=8)
    assert counts[0] == 0 and counts[1] == 8  # 6 units < one multiple; 16 would land farther from 10 than 8


def test_global_allocation_in_shrink_meets_the_ratio_and_reports_each_groups_ratio() -> None:
    rng = np.random.default_rng(5603)  # this function's own data, whatever ran before
    model, _, _ = residual_stack(hidden=16, small=1)
    calib = CalibrationRequest(data={"x": draw(rng, 64, 8, scale=1.0)}, batch_size=16)
    m = ir.from_proto(model)
    config = ShrinkConfig(ratio=0.25, method=StructuredMethod.FLAP, allocate="global", ratio_max=0.75)
    report = shrink_model(m, config, calib)
    removed = [len(g.removed) for g in report.groups]
    assert sum(removed) == 12  # a quarter of 48 neurons, every group's neurons cost the same
    assert [g.ratio for g in report.groups] == [round(n / 16, 4) for n in removed]
    assert max(removed) <= 12 and len(set(removed)) > 1  # uneven: the groups differ
    assert report.to_dict()["groups"][0]["ratio"] == report.groups[0].ratio


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(GraphpruneError, match="per-layer bounds"):
        ShrinkConfig(ratio=0.25, ratio_min=0.5, ratio_max=0.4).validate()
    with pytest.raises(GraphpruneError, match="allocation"):
        ShrinkConfig(ratio=0.25, allocate="everywhere").validate()


def test_allocate_by_shares_the_budget_by_one_score_and_chooses_units_by_the_method() -> None:
    rng = np.random.default_rng(5604)  # this function's own data, whatever ran before
    model, _, _ = residual_stack(hidden=16, small=1)
    calib = CalibrationRequest(data={"x": draw(rng, 64, 8, scale=1.0)}, batch_size=16)

    def shrunk(config: ShrinkConfig) -> list[list[int]]:
        return [g.removed for g in shrink_model(ir.from_proto(model), config, calib).groups]

    base = ShrinkConfig(ratio=0.25, allocate="global", ratio_max=0.75, refit=True)
    by_flap = StructuredMethod.FLAP
    flap = shrunk(replace(base, method=by_flap))
    mixed = shrunk(replace(base, method=StructuredMethod.OBS, allocate_by=by_flap))
    assert [len(r) for r in mixed] == [len(r) for r in flap]  # the shares: flap's
    names = [g.name for g in shrink_model(ir.from_proto(model), base, calib).groups]
    # the units: obs's own choice at those counts, as per-group ratios of a uniform obs shrink give them
    overrides = tuple((n, len(r) / 16) for n, r in zip(names, flap, strict=True))
    obs = shrunk(replace(base, method=StructuredMethod.OBS, allocate="uniform", overrides=overrides))
    assert mixed == obs
    with pytest.raises(GraphpruneError, match="allocate_by"):
        replace(base, method=StructuredMethod.OBS, allocate_by=StructuredMethod.L2).validate()


def test_unstandardised_allocation_takes_the_lowest_raw_scores_of_all_groups() -> None:
    rng = np.random.default_rng(5605)  # this function's own data, whatever ran before
    widths = [40, 40, 40]
    scores = _scores(rng, widths)  # group i on the scale 10**i: raw, the first group's units go first
    counts = allocate(scores, widths, [1.0] * 3, budget=36.0, standardised=False)
    owner = np.repeat(np.arange(3), widths)
    chosen = owner[np.argsort(np.concatenate(scores), kind="stable")[:36]]
    assert counts == np.bincount(chosen, minlength=3).tolist()
    assert counts != allocate(scores, widths, [1.0] * 3, budget=36.0)  # standardised shares differ
    model, _, _ = residual_stack(hidden=16, small=1)
    calib = CalibrationRequest(data={"x": draw(rng, 64, 8, scale=1.0)}, batch_size=16)
    config = ShrinkConfig(ratio=0.25, method=StructuredMethod.OBS, allocate="error", ratio_max=0.75)
    report = shrink_model(ir.from_proto(model), config, calib)
    assert sum(len(g.removed) for g in report.groups) == 12 and report.config.allocate == "error"


def test_each_group_keeps_a_multiple_of_its_own_multiple() -> None:
    # one multiple per group (round_to counted in channels: 8 neurons, or 1 head of 32 channels)
    rng = np.random.default_rng(5610)  # this function's own data, whatever ran before
    widths = [48, 48, 12, 12]
    scores = _scores(rng, widths)
    counts = allocate(scores, widths, [1.0] * 4, budget=30.0, multiple=[8, 8, 1, 1])
    for n, w, k in zip(counts, widths, [8, 8, 1, 1], strict=True):
        assert (w - n) % k == 0 and w - n >= k
    assert abs(sum(counts) - 30) <= 4 and counts[2] + counts[3] > 0  # within half a chunk; the heads trade too
    same = allocate(scores, widths, [1.0] * 4, budget=30.0, multiple=[8] * 4)
    assert same == allocate(scores, widths, [1.0] * 4, budget=30.0, multiple=8)
    assert set(same[2:]) <= {0, 4}  # with one multiple of 8 for all, the 12-unit groups keep 12 or 8


def test_global_allocation_in_shrink_keeps_widths_on_the_round_to_grid() -> None:
    rng = np.random.default_rng(5611)  # this function's own data, whatever ran before
    model, _, _ = residual_stack(hidden=16, small=1)
    calib = CalibrationRequest(data={"x": draw(rng, 64, 8, scale=1.0)}, batch_size=16)
    config = ShrinkConfig(ratio=0.25, method=StructuredMethod.FLAP, allocate="global", ratio_max=0.75, round_to=4)
    report = shrink_model(ir.from_proto(model), config, calib)
    assert all(g.units_after % 4 == 0 for g in report.groups)
    assert sum(len(g.removed) for g in report.groups) == 12  # a quarter of 48 neurons, in chunks of 4
