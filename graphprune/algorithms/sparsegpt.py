"""SparseGPT (Frantar & Alistarh, 2023): prune a weight and update the survivors to reconstruct ``W X``.

Pure numpy on the canonical ``(out, K)`` layout (rows: output neurons, columns: the reduction axis K) and the
Gram matrix ``H = Σ xᵀx`` of the layer's inputs over the calibration rows, as the reference
(``fasterprune`` in locuslab/wanda ``lib/sparsegpt.py``) specifies:

1. dead inputs (``H_jj == 0``): ``H_jj = 1`` and column j of W is zeroed;
2. dampening: ``λ = percdamp · mean(diag H)`` added to the diagonal;
3. ``U``: the upper Cholesky factor of ``H⁻¹`` (``H⁻¹ = Uᵀ U``), so that row j of U is the OBS update of the
   columns j.. once the columns before j are fixed, and ``U_jj² = [H_F⁻¹]_jj`` for F = {j, .., K-1};
4. columns in blocks of ``blocksize``; inside a block, column by column: choose the mask by the saliency
   ``w² / U_jj²``, set ``q = w ⊙ mask``, ``err = (w - q) / U_jj``, ``W[:, j:] -= err ⊗ U[j, j:]`` within the
   block, and once the block is done apply its accumulated errors to the later columns in one product
   (lazy batch update).

Mask selection
--------------
* N:M: at every column j with ``j % group == 0``, among columns ``j .. j+group-1`` (already updated by the
  errors of the columns before j) each row keeps the ``keep`` largest saliencies (:func:`masks.nm_mask`).
  Groups never straddle a block: the block size is rounded down to a multiple of ``group``.
* Unstructured: chosen at the start of each block from the block's current weights, as the reference does.
  The reference prunes ``tmp <= sort(tmp)[int(numel · s)]``, which prunes one weight too many per block and
  more on ties; here the counts are exact. A comparison group (the whole layer for ``Scope.LAYER``, the
  reference's behaviour and SparseGPT's default; each row for ``Scope.OUTPUT``; each column for
  ``Scope.INPUT``) of n weights loses ``int(n · s)`` of them, as :mod:`~graphprune.algorithms.masks` counts,
  spread over the blocks by the cumulative rule ``c(i) = ⌊n_prune · i / K⌋`` (the block ``[i1, i2)`` prunes
  ``c(i2) - c(i1)``), so the layer ends with exactly the same number of zeros as a one-shot mask would.
* Tie rules: N:M follows :mod:`~graphprune.algorithms.masks` (tie keys of the positions in the ``(rows, M)``
  slice being masked); unstructured keeps the earlier of equal saliencies, i.e. the later position is pruned
  first — in row-major order of the block for ``Scope.LAYER``, along K for ``Scope.OUTPUT``, along the rows
  for ``Scope.INPUT`` (continuous saliencies rarely tie).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graphprune.algorithms.arrays import choose_ops
from graphprune.algorithms.dense_target import dense_target_weight
from graphprune.algorithms.masks import nm_mask
from graphprune.algorithms.pattern import NMPattern, Pattern, Scope, Unstructured

# Compute precision. H and its inverse Cholesky factor are always float64: they cost O(K³) once, and H⁻¹ of
# a Gram matrix is ill-conditioned (λ = 1% of the mean diagonal bounds it only loosely), so float32 there loses
# digits that every later update inherits. The weight updates (O(out·K·blocksize) for the rank-1 steps,
# O(out·K²) for the lazy block products) are the bulk of the time and memory. Up to K = 4096 they run in
# float64 too: on a CPU float32 saves little there (the rank-1 steps are bound by memory traffic and Python,
# not flops; BENCHMARKS.md, "Figures moved out of the code"), the working copy of W stays small, and the masks
# match an exact reference even where saliencies almost tie. Beyond that the working copy and the block
# products switch to float32, as the reference runs all of its updates; the accumulated rounding stays far
# below the pruning error itself (float32 ~1e-7 relative per step, H⁻¹ itself still exact to float64).
FLOAT64_MAX_K = 4096
NOT_POSITIVE_DEFINITE = "the dampened Gram matrix is not positive definite; raise percdamp or check the statistics"


def sparsegpt(
    weight: np.ndarray,
    gram: np.ndarray,
    pattern: Pattern,
    percdamp: float = 0.01,
    blocksize: int = 128,
    compute_dtype: np.dtype | type | None = None,
    device: str = "auto",
    cross: np.ndarray | None = None,
) -> np.ndarray:
    """Pruned and updated copy of ``weight`` ``(out, K)``, in its dtype, zero where pruned.

    ``gram`` is ``Σ xᵀx`` ``(K, K)`` over the calibration rows (any common scale gives the same result).
    ``compute_dtype`` overrides the automatic choice (float64 up to K = 4096, float32 beyond). ``device``:
    ``"auto"`` runs on a CUDA GPU through PyTorch when both are present (:mod:`.sparsegpt_torch`), else numpy;
    ``"numpy"``; or a torch device (``"cpu"``, ``"cuda:1"``), as :func:`~graphprune.algorithms.arrays.choose_ops`.
    ``cross``: the cross-Gram ``Σ x_denseᵀ x`` to aim at the dense model's outputs (:mod:`.dense_target`).
    """
    return sparsegpt_with_mask(weight, gram, pattern, percdamp, blocksize, compute_dtype, device, cross)[0]


def sparsegpt_with_mask(
    weight: np.ndarray,
    gram: np.ndarray,
    pattern: Pattern,
    percdamp: float = 0.01,
    blocksize: int = 128,
    compute_dtype: np.dtype | type | None = None,
    device: str = "auto",
    cross: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """As :func:`sparsegpt`, plus the boolean keep-mask (True = kept) the solver chose."""
    rows, k = _check_inputs(weight, gram, pattern, percdamp, blocksize)
    if cross is not None and rows and k:  # dense targets: the usual problem of W' = W(C + λI)(H + λI)⁻¹
        weight = dense_target_weight(weight, gram, cross, percdamp).astype(weight.dtype)
    if compute_dtype is None:
        compute_dtype = np.float64 if k <= FLOAT64_MAX_K else np.float32
    dtype = np.dtype(compute_dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"compute_dtype must be float32 or float64, got {dtype}")

    if rows == 0 or k == 0:
        return weight.copy(), np.ones((rows, k), dtype=bool)
    ops = choose_ops(device)
    if ops.name == "torch":
        from graphprune.algorithms.sparsegpt_torch import sparsegpt_torch_with_mask

        return sparsegpt_torch_with_mask(weight, gram, pattern, percdamp, blocksize, dtype, ops)

    w = np.array(weight, dtype=dtype, copy=True)
    keep = np.ones((rows, k), dtype=bool)
    hinv_u = _inverse_cholesky_upper(gram, w, percdamp)  # float64, zeroes dead columns of w in place
    d_all = np.diag(hinv_u).copy()
    hinv_w = hinv_u.astype(dtype, copy=False)
    obs_blocks(w, keep, hinv_w, d_all, pattern, blocksize, NumpyBackend(dtype))
    return w.astype(weight.dtype, copy=False), keep


class NumpyBackend:
    """The calls of :func:`obs_blocks` that differ between numpy and torch (``sparsegpt_torch.TorchBackend``)."""

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype

    def copy(self, x: np.ndarray) -> np.ndarray:
        return x.copy()

    def zeros_like(self, x: np.ndarray) -> np.ndarray:
        return np.zeros_like(x)

    def all_kept(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.ones(shape, dtype=bool)

    def block_keep(
        self, w1: np.ndarray, d1: np.ndarray, scope: Scope, n_prune: int, i1: int, i2: int, k: int
    ) -> np.ndarray:
        return _block_unstructured_keep(w1, d1, scope, n_prune, i1, i2, k)

    def group_keep(self, scores: np.ndarray, pattern: NMPattern) -> np.ndarray:
        return nm_mask(scores, pattern)

    def errors(self, kept: np.ndarray, column: np.ndarray, d: np.ndarray) -> np.ndarray:
        return np.where(kept, 0.0, column / d).astype(self.dtype, copy=False)

    def subtract_outer(self, target: np.ndarray, e: np.ndarray, row: np.ndarray) -> None:
        target -= np.outer(e, row)


def obs_blocks(
    w: Any,
    keep: Any,
    hinv_w: Any,
    d_all: Any,
    pattern: Pattern | None,
    blocksize: int,
    backend: Any,
    rounder: Any = None,
) -> None:
    """Step 4 of the module docstring, in place on ``w`` and ``keep`` (numpy arrays or torch tensors alike):
    the columns in blocks, the OBS updates column by column inside a block, one lazy product per block.

    ``pattern=None``: the mask is given in ``keep`` (GPTQ under a mask). ``rounder``
    (:class:`~graphprune.algorithms.gptq.ColumnRounder`, numpy only): each kept weight becomes its value on a
    quantization grid rather than itself, and that rounding error flows to the later columns as well."""
    rows, k = w.shape
    blocksize, n_prune = block_plan(pattern, rows, k, blocksize)
    if rounder is not None:
        blocksize = rounder.aligned_blocksize(blocksize)
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        w1 = backend.copy(w[:, i1:i2])
        err1 = backend.zeros_like(w1)
        u1 = hinv_w[i1:i2, i1:i2]
        d1 = d_all[i1:i2]
        if pattern is None:
            keep1 = backend.copy(keep[:, i1:i2])
        elif isinstance(pattern, NMPattern):
            keep1 = backend.all_kept(w1.shape)
        else:
            keep1 = backend.block_keep(w1, d1, pattern.scope, n_prune, i1, i2, k)
        for i in range(i2 - i1):
            if isinstance(pattern, NMPattern) and i % pattern.group == 0:
                g = slice(i, i + pattern.group)
                keep1[:, g] = backend.group_keep(_saliency(w1[:, g], d1[g]), pattern)
            if rounder is None:
                e = backend.errors(keep1[:, i], w1[:, i], u1[i, i])
                # Column i becomes q (kept entries: e = 0; pruned: w - w/d·d = 0, forced exactly below).
                backend.subtract_outer(w1[:, i:], e, u1[i, i:])
            else:
                q = rounder.column(i1 + i, i, w1, keep1)  # zero where pruned
                e = (w1[:, i] - q) / u1[i, i]
                backend.subtract_outer(w1[:, i:], e, u1[i, i:])
                w1[:, i] = q  # exactly the grid value, not w - e·d
            err1[:, i] = e
        w1[~keep1] = 0.0
        w[:, i1:i2] = w1
        keep[:, i1:i2] = keep1
        if i2 < k:
            w[:, i2:] -= err1 @ hinv_w[i1:i2, i2:]


def block_plan(pattern: Pattern | None, rows: int, k: int, blocksize: int) -> tuple[int, int]:
    """The column block size (N:M: a multiple of the group, so no group straddles a block) and how many weights
    each unstructured comparison group loses in all (0 for N:M and for a given mask, ``pattern=None``)."""
    if pattern is None:
        return blocksize, 0
    if isinstance(pattern, NMPattern):
        return max(pattern.group, blocksize - blocksize % pattern.group), 0
    if pattern.scope is Scope.LAYER:
        return blocksize, int(rows * k * pattern.sparsity)
    if pattern.scope is Scope.OUTPUT:
        return blocksize, int(k * pattern.sparsity)
    return blocksize, int(rows * pattern.sparsity)


def sparsegpt_reconstruction_error(weight: np.ndarray, weight_hat: np.ndarray, gram: np.ndarray) -> float:
    """``trace((W - Ŵ) H (W - Ŵ)ᵀ)``, i.e. ``‖(W - Ŵ) Xᵀ‖²_F`` when ``H = XᵀX`` (X: calibration rows, K)."""
    return float(row_reconstruction_errors(weight, weight_hat, gram).sum())


def row_reconstruction_errors(weight: np.ndarray, weight_hat: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """Each output row's share of :func:`sparsegpt_reconstruction_error`, ``(w - ŵ)ᵀ H (w - ŵ)``: float64
    ``(out,)``."""
    delta = np.asarray(weight, dtype=np.float64) - np.asarray(weight_hat, dtype=np.float64)
    return np.einsum("ij,ij->i", delta @ np.asarray(gram, dtype=np.float64), delta)


def _check_inputs(
    weight: np.ndarray, gram: np.ndarray, pattern: Pattern, percdamp: float, blocksize: int
) -> tuple[int, int]:
    if weight.ndim != 2:
        raise ValueError(f"weight must be (out, K), got shape {weight.shape}")
    rows, k = weight.shape
    if gram.shape != (k, k):
        raise ValueError(f"gram must be (K, K) = ({k}, {k}) for weight {weight.shape}, got {gram.shape}")
    # ml_dtypes' bfloat16 / float8 types are not numpy "floating" subtypes; their kind is "V".
    if not (np.issubdtype(weight.dtype, np.floating) or weight.dtype.kind == "V"):
        raise ValueError(f"weight must be a floating-point array, got {weight.dtype}")
    if blocksize < 1:
        raise ValueError(f"blocksize must be >= 1, got {blocksize}")
    if not percdamp >= 0.0:
        raise ValueError(f"percdamp must be >= 0, got {percdamp}")
    if isinstance(pattern, NMPattern) and k % pattern.group:
        raise ValueError(f"K={k} is not a multiple of the group size {pattern.group}")
    if not isinstance(pattern, NMPattern | Unstructured):
        raise TypeError(f"unsupported pattern {pattern!r}")
    if not (np.isfinite(gram).all() and np.isfinite(weight).all()):
        raise ValueError("weight and gram must be finite (no NaN or Inf)")
    return rows, k


def _inverse_cholesky_upper(gram: np.ndarray, w: np.ndarray, percdamp: float) -> np.ndarray:
    """Upper U with ``Uᵀ U = (H + λI)⁻¹`` in float64; zeroes the columns of ``w`` whose inputs never fired."""
    h = np.array(gram, dtype=np.float64, copy=True)
    h = 0.5 * (h + h.T)  # a streamed sum can be asymmetric in its last bits
    diag = np.einsum("ii->i", h)  # a writable view of the diagonal
    dead = diag == 0.0
    diag[dead] = 1.0
    w[:, dead] = 0.0
    diag += percdamp * float(np.mean(diag))
    # U is the reference's cholesky(cholesky_inverse(cholesky(H)), upper=True), obtained with one factorisation
    # and no explicit H⁻¹: with J the exchange matrix (reversal), J H J = L Lᵀ gives H = R Rᵀ for the upper
    # R = J L J, so H⁻¹ = (R⁻¹)ᵀ R⁻¹ and U = R⁻¹ = J L⁻¹ J (upper, positive diagonal: the unique factor).
    # About a third of the cubic work of the reference's three steps, and fewer rounding steps.
    try:
        lower = np.linalg.cholesky(h[::-1, ::-1])
    except np.linalg.LinAlgError as exc:
        raise ValueError(NOT_POSITIVE_DEFINITE) from exc
    return np.ascontiguousarray(_lower_triangular_inverse(lower)[::-1, ::-1])


def _lower_triangular_inverse(lower: np.ndarray) -> np.ndarray:
    """Inverse of a lower-triangular matrix by 2x2 block recursion (matrix products; numpy has no trtri)."""
    n = lower.shape[0]
    if n <= 64:
        return np.tril(np.linalg.inv(lower))
    m = n // 2
    top = _lower_triangular_inverse(lower[:m, :m])
    bottom = _lower_triangular_inverse(lower[m:, m:])
    out = np.zeros_like(lower)
    out[:m, :m] = top
    out[m:, m:] = bottom
    out[m:, :m] = -(bottom @ (lower[m:, :m] @ top))
    return out


def _saliency(w: np.ndarray, d: np.ndarray) -> np.ndarray:
    """OBS saliency ``w² / [H_F⁻¹]_jj`` (the constant 1/2 dropped), with ``d = U_jj``."""
    return (w / d) ** 2


def _cumulative_share(n_prune: int, i: int, k: int) -> int:
    return n_prune * i // k


def _block_unstructured_keep(
    w1: np.ndarray, d1: np.ndarray, scope: Scope, n_prune: int, i1: int, i2: int, k: int
) -> np.ndarray:
    """Keep-mask of one block: prune this block's share of ``n_prune`` lowest saliencies per comparison group."""
    scores = _saliency(w1, d1)
    if scope is Scope.INPUT:
        return ~_prune_lowest(np.ascontiguousarray(scores.T), n_prune).T
    share = _cumulative_share(n_prune, i2, k) - _cumulative_share(n_prune, i1, k)
    if scope is Scope.OUTPUT:
        return ~_prune_lowest(scores, share)
    return ~_prune_lowest(scores.reshape(1, -1), share).reshape(scores.shape)


def _prune_lowest(rows: np.ndarray, n_prune: int) -> np.ndarray:
    """Per row, True at the ``n_prune`` lowest scores; among equal scores the later positions go first."""
    n = rows.shape[1]
    if n_prune <= 0:
        return np.zeros(rows.shape, dtype=bool)
    if n_prune >= n:
        return np.ones(rows.shape, dtype=bool)
    # The n_prune-th smallest score is the threshold: everything below it goes, and of the scores equal to
    # it, the rightmost ones fill the remaining places (so the earlier ones are kept).
    threshold = np.partition(rows, n_prune - 1, axis=1)[:, n_prune - 1 : n_prune]
    below = rows < threshold
    at = rows == threshold
    places_left = n_prune - below.sum(axis=1, keepdims=True)
    at_from_right = np.cumsum(at[:, ::-1], axis=1)[:, ::-1]
    return below | (at & (at_from_right <= places_left))
