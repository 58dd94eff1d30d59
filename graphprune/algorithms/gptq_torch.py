"""GPTQ's column rounding on PyTorch tensors (a CUDA GPU, or CPU torch in the tests), for the shared OBS loop.

:func:`~graphprune.algorithms.gptq.gptq_quantize` runs SparseGPT's block loop
(:func:`~graphprune.algorithms.sparsegpt.obs_blocks`) on torch tensors with
:class:`~graphprune.algorithms.sparsegpt_torch.TorchBackend`; this module adds the one piece that differs: rounding
a column onto the grid, with numpy's arithmetic step for step (float32 scales from the float32 extremes of the
kept weights, the ratio in the compute precision, round half to even, saturation to the grid's range; E4M3
through float32), so that the codes equal the numpy path's. torch is imported by the caller's
:func:`choose_ops`, not here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from graphprune.algorithms.gptq import ColumnRounder, Rounding
from graphprune.algorithms.sparsegpt import obs_blocks
from graphprune.algorithms.sparsegpt_torch import TorchBackend, _inverse_cholesky_upper

if TYPE_CHECKING:
    from graphprune.algorithms.arrays import TorchOps


class TorchColumnRounder(ColumnRounder):
    """:class:`~graphprune.algorithms.gptq.ColumnRounder` on torch tensors; codes held as float32 values (exact
    for int8, int4 and E4M3 codes) until the end, since few torch kernels take float8 tensors."""

    def __init__(self, rounding: Rounding, ops: TorchOps):
        super().__init__(rounding)
        self.torch = ops.torch
        self.scales: Any = self.torch.as_tensor(rounding.scales, dtype=self.torch.float32, device=ops.device)
        self.codes: Any = self.torch.zeros(self.codes.shape, dtype=self.torch.float32, device=ops.device)
        self.qmax = self.torch.tensor(rounding.grid.qmax, dtype=self.torch.float32, device=ops.device)
        self.qmin = self.torch.tensor(rounding.grid.qmin, dtype=self.torch.float32, device=ops.device)

    def column(self, j: int, i: int, w1: Any, keep1: Any) -> Any:
        torch = self.torch
        b = int(self.block_of[j])
        if self.dynamic and j % int(self.grid.block_size) == 0:  # type: ignore[arg-type]  # dynamic: block_size set
            span = slice(i, i + int(self.grid.block_size))  # type: ignore[arg-type]  # as above
            block = torch.where(keep1[:, span], w1[:, span], 0.0)
            if self.clip != "none":  # the search on the host: once per scale block, not per column
                searched = self.searched(j, block.cpu().numpy())
                self.scales[:, b] = torch.as_tensor(searched, device=self.scales.device)
            else:
                block = block.float()  # quant_grid.grid_scales' arithmetic: float32 extremes over qmax and -qmin
                scale = torch.maximum(
                    block.clamp(min=0).amax(dim=1) / self.qmax, (-block).clamp(min=0).amax(dim=1) / -self.qmin
                )
                self.scales[:, b] = torch.where(scale > 0, scale, 1.0)
        scale = self.scales[:, b].to(w1.dtype)
        ratio = w1[:, i] / scale
        if self.grid.precision == "fp8":
            codes = ratio.clamp(self.grid.qmin, self.grid.qmax).float().to(torch.float8_e4m3fn).float()
        else:
            codes = torch.round(ratio).clamp(self.grid.qmin, self.grid.qmax).float()
        codes = torch.where(keep1[:, i], codes, 0.0)
        self.codes[:, j] = codes
        return codes.to(w1.dtype) * scale

    def numpy_codes(self) -> np.ndarray:
        return self.codes.cpu().numpy().astype(self.grid.code_dtype)


def torch_sweep(
    w_p: np.ndarray,
    keep_p: np.ndarray,
    gram_p: np.ndarray,
    pattern: Any,
    blocksize: int,
    percdamp: float,
    rounding: Rounding,
    ops: TorchOps,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The OBS loop with rounding on ``ops``' device: the permuted weight, mask and Gram matrix in, the codes,
    float32 scales and keep-mask (still in the sweep's column order) out."""
    torch = ops.torch
    w = ops.asarray(w_p, w_p.dtype.type)
    keep = torch.as_tensor(keep_p, device=ops.device)
    hinv_u = _inverse_cholesky_upper(torch, ops.asarray(gram_p, np.float64), w, percdamp)
    rounder = TorchColumnRounder(rounding, ops)
    obs_blocks(
        w, keep, hinv_u.to(w.dtype), hinv_u.diagonal().clone(), pattern, blocksize, TorchBackend(ops), rounder
    )
    return rounder.numpy_codes(), ops.to_numpy(rounder.scales), ops.to_numpy(keep)
