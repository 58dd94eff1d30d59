"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, 2022): round a weight onto a grid and update the weights not yet
rounded so that ``W X`` is reconstructed; under a sparsity mask, and jointly with SparseGPT's pruning.

numpy (or PyTorch, :mod:`.gptq_torch`, the same codes) on the canonical ``(out, K)`` layout and the Gram matrix
``H = Σ xᵀx`` of the layer's inputs, the same statistics SparseGPT and ALPS use. The steps, as the reference
(IST-DASLab/gptq ``fasterquant``) specifies:

1. dead inputs (``H_jj == 0``): ``H_jj = 1`` and column j of W is zeroed;
2. optional activation order: columns permuted by ``diag H`` descending (the most active inputs first, while
   the most weights are still free to absorb their error), undone at the end;
3. dampening ``λ = percdamp · mean(diag H)``, and ``U``, the upper Cholesky factor of ``(H + λI)⁻¹``
   (SparseGPT's construction, :func:`~graphprune.algorithms.sparsegpt._inverse_cholesky_upper`), so that row j of
   U is the OBS update of the columns j.. once the columns before j are fixed;
4. the columns in blocks of ``blocksize``; inside a block, column by column: ``q = Q(w)`` (the grid value),
   ``err = (w - q) / U_jj``, ``W[:, j:] -= err ⊗ U[j, j:]`` within the block; once the block is done its
   accumulated errors update the later columns in one product (lazy batch update). This is SparseGPT's loop
   (:func:`~graphprune.algorithms.sparsegpt.obs_blocks`) with rounding in place of masking, and it runs there.

Scales (:mod:`~graphprune.algorithms.quant_grid`'s: zero point 0, the extremes on ``qmax`` and ``qmin``):

* one per output row: computed once, before the sweep, from the (kept) weights, as the reference;
* one per block of ``block_size`` along K: computed when the sweep reaches the block's first column, from the
  weights as the earlier columns' errors have left them (the reference's ``groupsize``);
* with activation order and blocked scales: computed before the sweep from the original weights, block by block
  in the original column order (the reference's ``static_groups``), so that a block is still a contiguous run
  of K, the only form ONNX's blocked ``DequantizeLinear`` can express; in the permuted sweep each column is
  rounded with its original block's scale.
* with ``clip`` (:mod:`~graphprune.algorithms.clip_search`), each of those scales is the best shrink of its
  absmax instead of the absmax, searched at the same moment on the same weights (``"hessian"``: the error
  weighted by the block's diagonal block of H, in sweep order).

Under a mask ``keep`` (a pruned model): a pruned weight's target is 0 on every grid, and it is exactly 0, code 0,
in the output. The sweep treats it as SparseGPT treats a pruned weight: the updates of earlier columns may move
it transiently, and when its column is reached that value is removed and its error, with the kept weights'
rounding errors, flows to the weights after it; in the end every error lands on kept weights only. Scales are
computed from the kept weights only (a pruned weight's transient value must not widen the grid). A weight
given nonzero at a pruned position is pruned in the sweep the same way (SparseGPT with a fixed mask).

Joint pruning and quantization (:func:`sparsegpt_quantize`, the SparseGPT paper's joint mode, its reference
code's ``--wbits``): SparseGPT's loop, where each column's kept weights are rounded as they are fixed. Mask and
scale meet at a block's first column: a weight whose mask is not chosen yet counts as kept there (so the
per-row scales come from the dense weights, as the reference's joint mode computes them).

Deviations from the reference, on purpose:

* zero point 0: the reference's ``sym=True`` spends 2^b levels on ``[-2^(b-1), 2^(b-1) - 1]`` with scale
  ``2·absmax / (2^b - 1)`` and a zero point of 2^(b-1) (so +absmax is clipped); here the zero point is 0, what
  ONNX's DequantizeLinear without a zero point and TensorRT's symmetric quantization read, int8 on
  ``[-127, 127]`` with scale ``absmax / 127``, and int4 on ONNX's whole ``[-8, 7]`` with scale
  ``max(maxpos / 7, maxneg / 8)`` (:mod:`~graphprune.algorithms.quant_grid`), so neither extreme is clipped;
* the joint mode accepts blocked scales too (the reference's joint mode has one scale per row, found once on
  the dense weights);
* blocked scales are computed from the weights as the current block's updates have left them (the reference
  reads ``W``, which misses the updates of the earlier columns of the same block); the sweep's block size is
  rounded up to a multiple of the scale block size, so no scale block straddles a sweep block;
* with activation order, dead inputs (``H_jj == 0``) sort last (the reference sorts them as if ``H_jj = 1``);
* the weight updates run in float64 up to K = 4096 and in float32 beyond, as SparseGPT's (``FLOAT64_MAX_K``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from graphprune.algorithms.arrays import choose_ops
from graphprune.algorithms.clip_search import ClipMode, searched_scales
from graphprune.algorithms.pattern import Pattern, Unstructured
from graphprune.algorithms.quant_grid import QuantGrid, quantize_codes
from graphprune.algorithms.sparsegpt import (
    FLOAT64_MAX_K,
    NumpyBackend,
    _check_inputs,
    _inverse_cholesky_upper,
    obs_blocks,
)


def gptq_quantize(
    w: np.ndarray,
    hessian: np.ndarray,
    grid: QuantGrid,
    *,
    keep: np.ndarray | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    clip: ClipMode = "none",
    device: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Codes ``(out, K)`` (``grid.code_dtype``) and float32 scales ``(out, n_blocks)`` of ``w`` ``(out, K)``.

    ``hessian`` is the Gram matrix ``Σ xᵀx`` ``(K, K)`` (any common scale gives the same result). ``keep``: the
    boolean keep-mask (True = kept) of a pruned weight; every other position gets code 0. ``clip``: each scale
    is the best clip of its group's absmax (:mod:`~graphprune.algorithms.clip_search`) instead of the absmax.
    ``device`` as SparseGPT's: ``"auto"`` (a CUDA GPU through PyTorch when both are present, else numpy),
    ``"numpy"``, or a torch device (:mod:`.gptq_torch`; the same codes).
    """
    rows, k = _check_inputs(w, hessian, Unstructured(0.0), percdamp, blocksize)
    keep = _check_keep(keep, (rows, k))
    codes, scales, _ = _sweep(w, hessian, grid, None, keep, blocksize, percdamp, act_order, device, clip)
    return codes, scales


def sparsegpt_quantize(
    w: np.ndarray,
    hessian: np.ndarray,
    pattern: Pattern,
    grid: QuantGrid,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    device: str = "auto",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Joint mode: SparseGPT pruning of ``w`` to ``pattern`` with every kept weight rounded onto ``grid`` as its
    column is fixed. Codes, float32 scales and the keep-mask the solver chose (``device`` as :func:`gptq_quantize`;
    on torch, N:M ties may fall otherwise, as SparseGPT's)."""
    rows, k = _check_inputs(w, hessian, pattern, percdamp, blocksize)
    keep = np.ones((rows, k), dtype=bool)
    return _sweep(w, hessian, grid, pattern, keep, blocksize, percdamp, False, device)


@dataclass(frozen=True)
class Rounding:
    """What a sweep rounds onto: ``block_of[j]``, the scale block of sweep column j; ``scales`` filled before the
    sweep (``static``) or block by block as the sweep reaches each block's first column, then with ``clip``
    searched on the block's current weights (and ``gram``'s diagonal block, in sweep order, for the
    ``"hessian"`` clip)."""

    grid: QuantGrid
    scales: np.ndarray
    block_of: np.ndarray
    static: bool
    clip: ClipMode = "none"
    gram: np.ndarray | None = None


class ColumnRounder:
    """Rounds the kept weights of each column of the OBS sweep onto a grid and records the codes (numpy arrays;
    :class:`~graphprune.algorithms.gptq_torch.TorchColumnRounder` on torch tensors), as ``rounding`` says."""

    def __init__(self, rounding: Rounding) -> None:
        grid = rounding.grid
        self.grid = grid
        self.column_grid = replace(grid, block_size=None)  # one column, one scale per row
        self.scales = rounding.scales
        self.block_of = rounding.block_of
        self.dynamic = not rounding.static and grid.block_size is not None
        self.clip = rounding.clip
        self.gram = rounding.gram
        self.codes = np.zeros((self.scales.shape[0], self.block_of.shape[0]), dtype=grid.code_dtype)

    def searched(self, j: int, block: np.ndarray) -> np.ndarray:
        """The scales ``(out,)`` of the scale block starting at sweep column ``j`` (``block``: its current
        weights, pruned positions 0, as numpy): absmax, or its best clip."""
        span = slice(j, j + block.shape[1])
        gram = self.gram[span, span] if self.gram is not None else None
        return searched_scales(block, self.column_grid, self.clip, gram)[:, 0]

    def aligned_blocksize(self, blocksize: int) -> int:
        """The sweep's block size, a multiple of the scale block where scales are computed during the sweep."""
        if not self.dynamic:
            return blocksize
        return math.lcm(blocksize, int(self.grid.block_size))  # type: ignore[arg-type]  # dynamic: block_size set

    def column(self, j: int, i: int, w1: np.ndarray, keep1: np.ndarray) -> np.ndarray:
        """The grid values of sweep column ``j`` (column ``i`` of the current block ``w1``), 0 where pruned."""
        b = self.block_of[j]
        if self.dynamic and j % int(self.grid.block_size) == 0:  # type: ignore[arg-type]  # dynamic: block_size set
            span = slice(i, i + int(self.grid.block_size))  # type: ignore[arg-type]  # as above
            self.scales[:, b] = self.searched(j, np.where(keep1[:, span], w1[:, span], 0.0))
        scale = self.scales[:, b : b + 1]
        codes = quantize_codes(w1[:, i : i + 1], scale, self.column_grid)[:, 0]
        codes[~keep1[:, i]] = 0
        self.codes[:, j] = codes
        return codes.astype(w1.dtype) * scale[:, 0].astype(w1.dtype)


def _sweep(
    weight: np.ndarray,
    gram: np.ndarray,
    grid: QuantGrid,
    pattern: Pattern | None,
    keep: np.ndarray,
    blocksize: int,
    percdamp: float,
    act_order: bool,
    device: str,
    clip: ClipMode = "none",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps 1-4 of the module docstring; ``pattern=None``: ``keep`` is the given mask."""
    rows, k = weight.shape
    dtype = np.dtype(np.float64 if k <= FLOAT64_MAX_K else np.float32)
    w = np.array(weight, dtype=dtype, copy=True)
    n_blocks = grid.n_blocks(k)
    if rows == 0 or k == 0:
        return np.zeros((rows, k), grid.code_dtype), np.ones((rows, n_blocks), np.float32), keep
    diag = np.diag(gram)
    perm = np.argsort(-diag, kind="stable") if act_order else np.arange(k)
    dead = diag == 0.0
    w[:, dead] = 0.0  # before any scale is computed; _inverse_cholesky_upper does it again in the permuted copy
    static = act_order or grid.block_size is None
    # Static scales from the kept weights; a pruned position's value is removed (and compensated) in the sweep.
    if static:
        hessian = gram if clip == "hessian" else None  # read only by the hessian clip: no float64 K x K copy
        scales = searched_scales(np.where(keep, w, 0.0), grid, clip, hessian)
    else:
        scales = np.ones((rows, n_blocks), np.float32)
    w_p = np.ascontiguousarray(w[:, perm])
    keep_p = np.ascontiguousarray(keep[:, perm])
    gram_p = np.asarray(gram)[np.ix_(perm, perm)]
    block_gram = gram_p if clip == "hessian" and not static else None
    rounding = Rounding(grid, scales, grid.scale_columns(k)[perm], static, clip, block_gram)
    inverse = np.argsort(perm)
    ops = choose_ops(device)
    if ops.name == "torch":
        from graphprune.algorithms.gptq_torch import torch_sweep

        codes, scales, keep_p = torch_sweep(w_p, keep_p, gram_p, pattern, blocksize, percdamp, rounding, ops)
        return codes[:, inverse], scales, keep_p[:, inverse]
    rounder = ColumnRounder(rounding)
    hinv_u = _inverse_cholesky_upper(gram_p, w_p, percdamp)
    hinv_w = hinv_u.astype(dtype, copy=False)
    obs_blocks(w_p, keep_p, hinv_w, np.diag(hinv_u).copy(), pattern, blocksize, NumpyBackend(dtype), rounder)
    return rounder.codes[:, inverse], rounder.scales, keep_p[:, inverse]


def _check_keep(keep: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray:
    if keep is None:
        return np.ones(shape, dtype=bool)
    keep = np.asarray(keep)
    if keep.shape != shape:
        raise ValueError(f"keep must have the weight's shape {shape}, got {keep.shape}")
    if keep.dtype != np.bool_:
        raise ValueError(f"keep must be a boolean mask, got {keep.dtype}")
    return keep


def prune_and_quantize(
    w: np.ndarray,
    hessian: np.ndarray,
    pattern: Pattern | None,
    grid: QuantGrid,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[np.ndarray, np.ndarray]:
    """The pruning pass's joint mode: codes ``(out, K)`` and float32 scales ``(out, n_blocks)`` on ``grid``. With a
    ``pattern``, :func:`sparsegpt_quantize`; without (``w`` already pruned, e.g. by ALPS), GPTQ under ``w``'s own
    zeros. The weights are ``dequantize_codes(codes, scales, grid)``, what a DequantizeLinear of them computes."""
    if pattern is None:
        return gptq_quantize(w, hessian, grid, keep=w != 0, blocksize=blocksize, percdamp=percdamp)
    codes, scales, _ = sparsegpt_quantize(w, hessian, pattern, grid, blocksize=blocksize, percdamp=percdamp)
    return codes, scales
