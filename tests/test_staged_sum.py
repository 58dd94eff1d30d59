"""Batch Gram terms are summed in float32 stages and then in float64 (``StagedSum``): the total must match numpy's
float64 sum over more batches than one stage holds, and equal terms must give bit-equal totals (C = H)."""

from __future__ import annotations

import numpy as np

from graphprune.calibration.gram_taps import STAGED_BATCHES, StagedSum


def test_staged_sum_matches_float64_over_several_stages_and_equal_terms_give_equal_totals() -> None:
    rng = np.random.default_rng(4411)
    terms = [rng.standard_normal((24, 24)).astype(np.float32) * 1e3 for _ in range(2 * STAGED_BATCHES + 5)]
    staged, twin = StagedSum((24, 24)), StagedSum((24, 24))
    for i, term in enumerate(terms):
        staged.add(term)
        twin.add(term.copy())
        if i == STAGED_BATCHES + 2:  # a read mid-stage must not lose or double-count the staged terms
            so_far = np.sum(np.asarray(terms[: i + 1], np.float64), axis=0)
            np.testing.assert_allclose(staged.value(), so_far, rtol=1e-5, atol=1e-2)
            np.testing.assert_allclose(twin.value(), so_far, rtol=1e-5, atol=1e-2)
    reference = np.sum(np.asarray(terms, np.float64), axis=0)
    np.testing.assert_allclose(staged.value(), reference, rtol=1e-5, atol=1e-2)
    np.testing.assert_array_equal(twin.value(), staged.value())
