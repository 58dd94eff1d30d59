"""SparseGPT on PyTorch: the numpy solver's masks and weights, on CPU torch here and on CUDA where present."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from graphprune.algorithms.arrays import TorchOps
from graphprune.algorithms.masks import nm_violations
from graphprune.algorithms.pattern import NMPattern, Pattern, Scope, Unstructured
from graphprune.algorithms.sparsegpt import sparsegpt_with_mask
from graphprune.algorithms.sparsegpt_torch import sparsegpt_torch_with_mask

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch (CPU is enough)")

PATTERNS = [
    NMPattern(2, 4),
    Unstructured(0.5, Scope.OUTPUT),
    Unstructured(0.5, Scope.LAYER),
    Unstructured(0.5, Scope.INPUT),
]


def random_layer(seed: int, rows: int = 24, k: int = 96, dead: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A weight and the Gram matrix of correlated inputs, a few of which never fire."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((400, k)) @ (np.eye(k) + 0.3 * rng.standard_normal((k, k)) / np.sqrt(k))
    x[:, rng.choice(k, dead, replace=False)] = 0.0
    return rng.standard_normal((rows, k)).astype(np.float32), x.T @ x


def pattern_id(pattern: Pattern) -> str:
    return str(pattern) if isinstance(pattern, NMPattern) else f"50%-{pattern.scope.value}"


@pytest.mark.parametrize("pattern", PATTERNS, ids=pattern_id)
@pytest.mark.parametrize("compute", [np.float64, np.float32])
def test_cpu_torch_equals_numpy(pattern: Pattern, compute: type) -> None:
    """Blocks of 16 columns over K = 96: the lazy block updates and the per-block unstructured shares both run."""
    w, h = random_layer(14)
    w = w.astype(compute)  # the result comes back in the weight's dtype: float64 shows the float64 path's error
    expected, expected_keep = sparsegpt_with_mask(w, h, pattern, 0.01, 16, compute, device="numpy")
    got, keep = sparsegpt_with_mask(w, h, pattern, 0.01, 16, compute, device="cpu")
    np.testing.assert_array_equal(keep, expected_keep)
    assert got.dtype == w.dtype
    tolerance = 1e-12 if compute is np.float64 else 1e-6  # float32 updates may round in another order
    np.testing.assert_allclose(got, expected, rtol=0, atol=tolerance * np.abs(expected).max())
    assert not got[~keep].any()
    if isinstance(pattern, NMPattern):
        assert nm_violations(got, pattern).size == 0


def test_auto_is_numpy_without_a_gpu_and_the_torch_module_on_a_torch_device() -> None:
    import torch

    w, h = random_layer(3, rows=8, k=32)
    pattern = NMPattern(2, 4)
    direct = sparsegpt_torch_with_mask(w, h, pattern, 0.01, 8, np.dtype(np.float64), TorchOps("cpu"))
    via_device = sparsegpt_with_mask(w, h, pattern, 0.01, 8, device="cpu")
    np.testing.assert_array_equal(direct[0], via_device[0])
    if not torch.cuda.is_available():
        numpy_result = sparsegpt_with_mask(w, h, pattern, 0.01, 8, device="numpy")
        np.testing.assert_array_equal(sparsegpt_with_mask(w, h, pattern, 0.01, 8)[0], numpy_result[0])


def test_a_singular_gram_is_refused_as_by_numpy() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 16))
    h = x.T @ x  # rank 4, every input fires: not positive definite without dampening
    w = rng.standard_normal((4, 16))
    for device in ("numpy", "cpu"):
        with pytest.raises(ValueError, match="not positive definite"):
            sparsegpt_with_mask(w, h, NMPattern(2, 4), percdamp=0.0, device=device)


def _cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs torch with a CUDA GPU")
@pytest.mark.parametrize("pattern", [NMPattern(2, 4), Unstructured(0.5, Scope.OUTPUT)], ids=pattern_id)
def test_cuda_equals_numpy(pattern: Pattern) -> None:
    w, h = random_layer(41, rows=64, k=256)
    expected, expected_keep = sparsegpt_with_mask(w, h, pattern, 0.01, 128, device="numpy")
    got, keep = sparsegpt_with_mask(w, h, pattern, 0.01, 128, device="auto")  # auto: the GPU
    assert (keep != expected_keep).mean() < 1e-3  # GPU float64 products may break a near-tie otherwise
    np.testing.assert_allclose(got[keep & expected_keep], expected[keep & expected_keep], atol=1e-4)


def test_auto_does_not_import_torch_where_no_nvidia_device_exists() -> None:
    """torch is installed, but a machine without /dev/nvidia* cannot have a CUDA GPU: "auto" must not pay torch's
    import (seconds, ~200 MB) to find that out."""
    import subprocess
    import sys

    from graphprune.algorithms.arrays import _cuda_device_nodes

    if _cuda_device_nodes():
        pytest.skip("this machine exposes an NVIDIA device (or is not Linux)")
    probe = (
        "import sys; from graphprune.algorithms.arrays import choose_ops; "
        "print(type(choose_ops('auto')).__name__, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["NumpyOps", "False"]
