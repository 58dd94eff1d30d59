"""Scale refit: with the codes fixed, the scales that reconstruct the layer's outputs best.

A weight row ``w`` (length K) quantized to codes ``q`` with one scale per block along K is ``ŵ = Σ_b s_b q_b``
(``q_b``: the codes of block b, zero elsewhere). Round to nearest and GPTQ choose the scales before the codes
(absmax or its best clip); once the codes are fixed, the scales that minimise the layer objective
``(w - ŵ)ᵀ H (w - ŵ)`` (``H = Σ xᵀx``, the Gram matrix of the layer's input, so the objective is the squared error
of ``x·w`` over the calibration rows) solve the normal equations of a least-squares problem with one unknown
per block:

    M s = v,   M_bc = q_bᵀ H q_c,   v_b = q_bᵀ H w.

Per row that is an ``n_blocks x n_blocks`` system (9 unknowns for K = 576 in blocks of 64). The old scales are a
feasible point, so the solution never has a larger objective; a row keeps its old scales where the solution is not
positive (a negative scale flips a block's codes, a grid the file does not describe), not finite, or, once
rounded to float32 as the file stores it, no better than the old ones. A block whose codes are all zero keeps its
scale (it multiplies nothing). Codes are unchanged, so every pruned weight (code 0) stays exactly zero.
"""

from __future__ import annotations

import numpy as np

from graphprune.algorithms.quant_grid import QuantGrid
from graphprune.algorithms.sparsegpt import row_reconstruction_errors


def refit_scales(
    w: np.ndarray, codes: np.ndarray, scales: np.ndarray, gram: np.ndarray, grid: QuantGrid
) -> np.ndarray:
    """Float32 scales ``(out, n_blocks)`` that minimise each row's objective for the fixed ``codes`` ``(out, K)``
    (``w``: the float weight the codes stand for; ``scales``: the scales they were rounded with)."""
    w64 = np.asarray(w, np.float64)
    rows, k = w64.shape
    gram = np.asarray(gram, np.float64)
    old = np.asarray(scales, np.float32)
    if gram.shape != (k, k) or codes.shape != (rows, k) or old.shape != (rows, grid.n_blocks(k)):
        raise ValueError(f"a ({rows}, {k}) weight needs ({k}, {k}) Gram, ({rows}, {k}) codes and matching scales")
    if rows == 0 or k == 0:
        return old.copy()
    q = codes.astype(np.float64)
    columns = grid.scale_columns(k)
    starts = np.flatnonzero(np.r_[True, columns[1:] != columns[:-1]])
    n = len(starts)
    # M[r, b, c] = Σ_{i∈b} Σ_{j∈c} q_ri H_ij q_rj: block b's codes through H, summed over block c against the codes
    m = np.empty((rows, n, n))
    for b, start in enumerate(starts):
        stop = starts[b + 1] if b + 1 < n else k
        through = q[:, start:stop] @ gram[start:stop, :]  # (rows, K)
        m[:, b, :] = np.add.reduceat(through * q, starts, axis=1)
    v = np.add.reduceat((w64 @ gram) * q, starts, axis=1)  # v[r, b] = q_bᵀ H w
    empty = np.add.reduceat(q != 0, starts, axis=1) == 0  # blocks with no non-zero code: s_b is free
    eye = np.eye(n, dtype=bool)
    m[empty[:, :, None] & eye] = 1.0  # their rows and columns of M are 0: pin s_b = the old scale
    v[empty] = old[empty]
    # the pseudo-inverse: a singular M (H rank-deficient on a block) still gives the least-norm solution
    solved = (np.linalg.pinv(m) @ v[:, :, None])[:, :, 0]
    new = solved.astype(np.float32)
    ok = np.isfinite(solved).all(axis=1) & (new > 0).all(axis=1)
    new[~ok] = old[~ok]
    expand = np.asarray(columns)
    before = row_reconstruction_errors(w64, q * old[:, expand], gram)
    after = row_reconstruction_errors(w64, q * new[:, expand], gram)
    better = after < before
    return np.where(better[:, None], new, old).astype(np.float32)
