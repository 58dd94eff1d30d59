"""GPTQ on PyTorch: the numpy solver's codes and scales, on CPU torch here and on CUDA where present."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from graphprune.algorithms.gptq import gptq_quantize, sparsegpt_quantize
from graphprune.algorithms.pattern import NMPattern
from graphprune.algorithms.quant_grid import QuantGrid
from tests.gram_data import correlated_layer, random_nm_keep

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch (CPU is enough)")

CASES = [
    ("int4", 16, False, False),
    ("int4", 24, False, True),  # K = 64 = 2 x 24 + 16: the last scale block is shorter
    ("int4", None, True, True),
    ("int8", None, False, True),
    ("fp8", 8, False, False),
    ("fp8", 16, True, True),
]


def _compare(device: str, precision: str, block: int | None, act_order: bool, masked: bool) -> None:
    w, gram = correlated_layer(21, rows=12, k=64)
    gram[:, 7] = gram[7, :] = 0.0  # a dead input
    keep = random_nm_keep(w, NMPattern(2, 4), 3) if masked else None
    grid = QuantGrid(precision=precision, block_size=block)  # type: ignore[arg-type]
    expected = gptq_quantize(w, gram, grid, keep=keep, blocksize=32, act_order=act_order, device="numpy")
    got = gptq_quantize(w, gram, grid, keep=keep, blocksize=32, act_order=act_order, device=device)
    assert got[0].dtype == expected[0].dtype == grid.code_dtype
    np.testing.assert_array_equal(got[0].astype(np.float32), expected[0].astype(np.float32))
    np.testing.assert_array_equal(got[1], expected[1])


@pytest.mark.parametrize(("precision", "block", "act_order", "masked"), CASES)
def test_cpu_torch_equals_numpy(precision: str, block: int | None, act_order: bool, masked: bool) -> None:
    _compare("cpu", precision, block, act_order, masked)


def test_cpu_torch_joint_mode_equals_numpy() -> None:
    w, gram = correlated_layer(22, rows=12, k=64)
    grid = QuantGrid(precision="int4", block_size=16)
    expected = sparsegpt_quantize(w, gram, NMPattern(2, 4), grid, blocksize=32, device="numpy")
    got = sparsegpt_quantize(w, gram, NMPattern(2, 4), grid, blocksize=32, device="cpu")
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize(("precision", "block", "act_order", "masked"), CASES)
def test_cuda_equals_numpy(precision: str, block: int | None, act_order: bool, masked: bool) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _compare("cuda", precision, block, act_order, masked)


@pytest.mark.parametrize("act_order", [False, True])
def test_cpu_torch_clip_search_equals_numpy(act_order: bool) -> None:
    # The scale search runs on the host for both (per scale block as the torch sweep reaches it).
    w, gram = correlated_layer(23, rows=12, k=64)
    keep = random_nm_keep(w, NMPattern(2, 4), 5)
    grid = QuantGrid(precision="int4", block_size=16)
    options = {"keep": keep, "blocksize": 32, "act_order": act_order, "clip": "hessian"}
    expected = gptq_quantize(w, gram, grid, device="numpy", **options)  # type: ignore[arg-type]
    got = gptq_quantize(w, gram, grid, device="cpu", **options)  # type: ignore[arg-type]
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
