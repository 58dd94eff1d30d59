"""SparseGPT on PyTorch: the solver of :mod:`graphprune.algorithms.sparsegpt`, step for step, on a torch device.

Chosen by ``sparsegpt(..., device="auto")`` when torch sees a CUDA GPU (:func:`~graphprune.algorithms.arrays.
choose_ops`, the helper the torch ALPS path uses); ``device="cpu"`` runs it on the CPU, as the tests do to compare
it with numpy. The maths is the numpy solver's: dead inputs, dampening, the upper Cholesky factor of ``H⁻¹`` (by
one factorisation of the reversed H and a triangular solve), and the same block loop
(:func:`~graphprune.algorithms.sparsegpt.obs_blocks`: rank-1 OBS updates inside a block, one lazy product per
block) run on tensors, in float64 up to K = 4096 and float32 beyond. Masks:

* N:M: chosen on the device, by ``topk`` over each group of columns (:meth:`TorchOps.keep_mask`); without ties
  (continuous saliencies) the same as numpy's, whose tie rule ``topk`` does not follow;
* unstructured: each block's share chosen by the numpy code itself, on the block's saliencies copied to the CPU
  (one copy per block of ``blocksize`` columns), so counts and tie rules are exactly numpy's.

torch is imported by the caller's :func:`choose_ops`, not here, so the package runs without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from graphprune.algorithms.pattern import NMPattern, Pattern, Scope
from graphprune.algorithms.sparsegpt import NOT_POSITIVE_DEFINITE, _block_unstructured_keep, obs_blocks

if TYPE_CHECKING:
    from graphprune.algorithms.arrays import TorchOps


def sparsegpt_torch_with_mask(
    weight: np.ndarray,
    gram: np.ndarray,
    pattern: Pattern,
    percdamp: float,
    blocksize: int,
    dtype: np.dtype,
    ops: TorchOps,
) -> tuple[np.ndarray, np.ndarray]:
    """Pruned and updated copy of ``weight`` ``(out, K)`` and its keep-mask; inputs already checked by the caller.

    ``dtype`` (float32 or float64) is the compute precision of the weight updates; H⁻¹ is always float64.
    """
    torch = ops.torch
    rows, k = weight.shape
    w = ops.asarray(np.asarray(weight, dtype=np.float64), dtype.type)
    hinv_u = _inverse_cholesky_upper(torch, ops.asarray(gram, np.float64), w, percdamp)
    d_all = hinv_u.diagonal().clone()
    hinv_w = hinv_u.to(w.dtype)
    keep = torch.ones((rows, k), dtype=torch.bool, device=ops.device)

    obs_blocks(w, keep, hinv_w, d_all, pattern, blocksize, TorchBackend(ops))
    return ops.to_numpy(w).astype(weight.dtype, copy=False), ops.to_numpy(keep)


class TorchBackend:
    """:func:`~graphprune.algorithms.sparsegpt.obs_blocks`' calls on torch tensors (see ``NumpyBackend``)."""

    def __init__(self, ops: TorchOps) -> None:
        self.ops = ops
        self.torch = ops.torch

    def copy(self, x: Any) -> Any:
        return x.clone()

    def zeros_like(self, x: Any) -> Any:
        return self.torch.zeros_like(x)

    def all_kept(self, shape: tuple[int, ...]) -> Any:
        return self.torch.ones(shape, dtype=self.torch.bool, device=self.ops.device)

    def block_keep(self, w1: Any, d1: Any, scope: Scope, n_prune: int, i1: int, i2: int, k: int) -> Any:
        """numpy's counts and tie rule, on the block's current weights (one copy to the CPU per block)."""
        chosen = _block_unstructured_keep(self.ops.to_numpy(w1), self.ops.to_numpy(d1), scope, n_prune, i1, i2, k)
        return self.torch.as_tensor(chosen, device=self.ops.device)

    def group_keep(self, scores: Any, pattern: NMPattern) -> Any:
        return self.ops.keep_mask(scores, pattern)  # topk on the device

    def errors(self, kept: Any, column: Any, d: Any) -> Any:
        return self.torch.where(kept, 0.0, column / d)

    def subtract_outer(self, target: Any, e: Any, row: Any) -> None:
        target.addr_(e, row, alpha=-1.0)


def _inverse_cholesky_upper(torch: Any, h: Any, w: Any, percdamp: float) -> Any:
    """Upper U with ``Uᵀ U = (H + λI)⁻¹`` in float64 (numpy's construction); zeroes w's dead columns in place."""
    h = 0.5 * (h + h.T)
    diag = h.diagonal()  # a writable view
    dead = diag == 0.0
    diag[dead] = 1.0
    w[:, dead] = 0.0
    diag += percdamp * diag.mean()
    # J H J = L Lᵀ (J: reversal) gives U = J L⁻¹ J, the upper factor of H⁻¹, without forming H⁻¹.
    lower, info = torch.linalg.cholesky_ex(h.flip(0, 1))
    if int(info) != 0:
        raise ValueError(NOT_POSITIVE_DEFINITE)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1).contiguous()
