"""Where a layer solver's dense linear algebra runs: numpy on the CPU, or PyTorch on a GPU when one is present.

A solver writes its loop once in the operators numpy arrays and torch tensors share (``@``, ``*``, ``.T``,
``.reshape``) and asks an :class:`ArrayOps` for the few calls that differ. torch is imported lazily, only when
asked for or when ``device="auto"`` finds a CUDA device, so the package runs and tests without it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np

from graphprune.algorithms.masks import mask_from_scores
from graphprune.algorithms.pattern import NMPattern, Pattern, Scope


class NumpyOps:
    """numpy on the CPU; masks come from :mod:`~graphprune.algorithms.masks` (its deterministic tie rule)."""

    name: Literal["numpy"] = "numpy"  # a Literal: `ops.name == "torch"` narrows ArrayOps

    def asarray(self, values: np.ndarray, dtype: type) -> np.ndarray:
        return np.asarray(values, dtype=dtype)

    def to_numpy(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x)

    def copy(self, x: np.ndarray) -> np.ndarray:
        return x.copy()

    def float32(self, x: np.ndarray) -> np.ndarray:
        return x.astype(np.float32)

    def zeros_like(self, x: np.ndarray) -> np.ndarray:
        return np.zeros_like(x)

    def where(self, keep: np.ndarray, x: np.ndarray) -> np.ndarray:
        return x * keep

    def eigh(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.linalg.eigh(h)

    def row_dot(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.einsum("ij,ij->i", a, b)[:, None]

    def keep_mask(self, scores: np.ndarray, pattern: Pattern) -> np.ndarray:
        return mask_from_scores(scores, pattern)


class TorchOps:
    """PyTorch on ``device``. Masks by ``topk``: ties may fall otherwise than numpy's rule (float noise anyway)."""

    name: Literal["torch"] = "torch"

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)

    def asarray(self, values: np.ndarray, dtype: type) -> Any:
        torch_dtype = self.torch.float64 if np.dtype(dtype) == np.float64 else self.torch.float32
        return self.torch.as_tensor(np.asarray(values), dtype=torch_dtype, device=self.device)

    def to_numpy(self, x: Any) -> np.ndarray:
        return x.detach().cpu().numpy()

    def copy(self, x: Any) -> Any:
        return x.clone()

    def float32(self, x: Any) -> Any:
        return x.float()

    def zeros_like(self, x: Any) -> Any:
        return self.torch.zeros_like(x)

    def where(self, keep: Any, x: Any) -> Any:
        return self.torch.where(keep, x, self.torch.zeros((), dtype=x.dtype, device=x.device))

    def eigh(self, h: Any) -> tuple[Any, Any]:
        return self.torch.linalg.eigh(h)

    def row_dot(self, a: Any, b: Any) -> Any:
        return (a * b).sum(dim=1, keepdim=True)

    def keep_mask(self, scores: Any, pattern: Pattern) -> Any:
        return torch_keep_mask(scores, pattern)


def torch_keep_mask(scores: Any, pattern: Pattern) -> Any:
    """The keep-mask of :func:`~graphprune.algorithms.masks.mask_from_scores` for a torch tensor ``(rows, K)``.

    On the tensor's device, by ``topk``: the same counts per comparison group (N:M groups along K; for
    unstructured patterns ``int(n · sparsity)`` pruned of each group of n: a row, a column or the layer, as
    ``pattern.scope`` says) and, where no scores tie, the same mask. Ties fall as ``topk`` lets them, not by
    numpy's tie rule. The one selection helper of the torch solvers (ALPS, SparseGPT).
    """
    import torch

    rows, k = scores.shape
    if isinstance(pattern, NMPattern):
        groups = scores.reshape(rows, k // pattern.group, pattern.group)
        return _top(torch, groups, pattern.keep).reshape(rows, k)
    if pattern.scope is Scope.OUTPUT:
        return _top(torch, scores, k - int(k * pattern.sparsity))
    if pattern.scope is Scope.LAYER:
        flat = scores.reshape(1, -1)
        return _top(torch, flat, flat.shape[1] - int(flat.shape[1] * pattern.sparsity)).reshape(rows, k)
    return _top(torch, scores.T, rows - int(rows * pattern.sparsity)).T


def _top(torch: Any, scores: Any, n_keep: int) -> Any:
    """True at the ``n_keep`` largest entries along the last axis."""
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if n_keep >= scores.shape[-1]:
        return keep | True
    index = torch.topk(scores, n_keep, dim=-1, sorted=False).indices
    return keep.scatter(-1, index, True)


ArrayOps = NumpyOps | TorchOps


def _cuda_device_nodes() -> bool:
    """Whether this machine exposes an NVIDIA device at all (Linux's /dev/nvidia*; elsewhere assume it may)."""
    if not sys.platform.startswith("linux"):
        return True
    return any(Path("/dev").glob("nvidia[0-9]*"))


def choose_ops(device: str = "auto") -> ArrayOps:
    """``"auto"``: torch on the first CUDA GPU when torch is installed and sees one, else numpy.

    ``"numpy"`` forces numpy; any other value is a torch device (``"cuda:1"``, or ``"cpu"`` to run the torch
    path without a GPU, as the tests do).
    """
    if device == "numpy":
        return NumpyOps()
    if device == "auto":
        # Importing torch costs seconds and ~200 MB: do it only where a GPU could be there at all.
        if importlib.util.find_spec("torch") is None or not _cuda_device_nodes():
            return NumpyOps()
        import torch

        return TorchOps("cuda") if torch.cuda.is_available() else NumpyOps()
    return TorchOps(device)
