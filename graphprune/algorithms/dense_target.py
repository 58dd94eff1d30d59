"""Dense targets: reconstruct the dense model's outputs from the pruned model's inputs.

Layer-wise solvers fit ``Ŵ X_p`` to ``W X_p`` (X_p: the inputs the already pruned prefix produces), so every layer
re-creates what the pruned prefix made of the dense outputs. Aiming at the dense model's own outputs instead::

    minimise  ‖W X_d - Ŵ X_p‖²_F   (X_d: the dense model's inputs of this layer on the same windows)

In the canonical ``(out, K)`` layout, with calibration rows x (so ``H = Σ x_pᵀ x_p`` and the cross-Gram
``C = Σ x_dᵀ x_p``, both ``(K, K)``; ``C[i, j]`` pairs dense channel i with pruned channel j)::

    ‖W X_d - Ŵ X_p‖² = tr(Ŵ H Ŵᵀ) - 2 tr(W C Ŵᵀ) + const

Only the linear term differs from the usual problem ``tr((W - Ŵ) H (W - Ŵ)ᵀ)``, whose linear term is ``W H``.

Damping. The solvers damp H by ``λ = percdamp · mean(diag H)``; minimising ``tr((W - Ŵ)(H + λI)(W - Ŵ)ᵀ)`` is the
least-squares objective plus ``λ‖W - Ŵ‖²``, a pull towards the dense weight. The same pull here makes the linear
term ``W (C + λI)``, so with nothing pruned upstream (``C = H``) everything reduces to the usual damped problem.

Reduction to the usual problem. With ``W' = W (C + λI)(H + λI)⁻¹`` (the unconstrained optimum),
``tr((W' - Ŵ)(H + λI)(W' - Ŵ)ᵀ)`` has the same quadratic and linear terms, so it differs from the damped
dense-target objective by a constant: any solver of the usual problem (SparseGPT's column loop, ALPS's ADMM, the
swaps) solves the dense-target one when given ``W'`` in place of ``W``. ALPS uses the linear term directly.

Tempered (blended) targets. Aiming all the way at the dense outputs fits each layer to outputs its perturbed
inputs cannot fully explain, and the least-squares answer shrinks the output towards its mean in the directions
where ``X_p`` is noisier than ``X_d`` (regression dilution), which LayerNorm and attention downstream can punish
more than the smaller squared error gains. A blend ``a ∈ [0, 1]`` minimises::

    a ‖W X_d - Ŵ X_p‖² + (1 - a) ‖W X_p - Ŵ X_p‖²  =  tr(Ŵ H Ŵᵀ) - 2 tr(W C_a Ŵᵀ) + const,
    C_a = a C + (1 - a) H

so it is the dense-target problem with ``C_a`` in place of ``C`` (:func:`blended_cross`): ``a = 0`` is the usual
problem, ``a = 1`` the dense target, and, since ``C_a + λI = a (C + λI) + (1 - a)(H + λI)``, the weight of the
reduction below is the convex combination ``a W'_dense + (1 - a) W``.

Inputs that never fired in the pruned model (``H_jj = 0``) cannot carry anything: their columns of the linear term
are zeroed (the solvers zero those weights), while W's own columns stay, since the dense model's input j may well
be alive and its contribution must then come through correlated channels.
"""

from __future__ import annotations

import numpy as np


def damped_gram(gram: np.ndarray, percdamp: float) -> tuple[np.ndarray, np.ndarray, float]:
    """``(H + λI, dead, λ)`` in float64 as the solvers form it: symmetrised, dead inputs' rows and columns zero
    with a unit diagonal, then ``λ = percdamp · mean(diag)`` added to the diagonal."""
    h = np.array(gram, dtype=np.float64, copy=True)
    h = 0.5 * (h + h.T)  # a streamed sum can be asymmetric in its last bits
    diag = np.einsum("ii->i", h)  # a writable view
    dead = diag <= 0.0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    diag[dead] = 1.0
    damping = percdamp * float(np.mean(diag)) if diag.size else 0.0
    diag += damping
    return h, dead, damping


def blended_cross(cross: np.ndarray, gram: np.ndarray, blend: float) -> np.ndarray:
    """``C_a = a C + (1 - a) H`` in float64 (``blend``: a in [0, 1]; 1 returns ``cross`` itself)."""
    if not 0.0 <= blend <= 1.0:
        raise ValueError(f"blend must be in [0, 1], got {blend}")
    if blend == 1.0:
        return cross
    c, h = np.asarray(cross, dtype=np.float64), np.asarray(gram, dtype=np.float64)
    if c.shape != h.shape:
        raise ValueError(f"cross {c.shape} and gram {h.shape} must have the same shape")
    return blend * c + (1.0 - blend) * h


def dense_linear_term(weight: np.ndarray, cross: np.ndarray, dead: np.ndarray, damping: float) -> np.ndarray:
    """``W (C + λI)``, float64, zero in the columns of dead inputs: the linear term of the damped objective."""
    w = np.asarray(weight, dtype=np.float64)
    c = np.asarray(cross, dtype=np.float64)
    if c.shape != (w.shape[1], w.shape[1]):
        raise ValueError(
            f"cross must be (K, K) = ({w.shape[1]}, {w.shape[1]}) for weight {w.shape}, got {c.shape}"
        )
    if not np.isfinite(c).all():
        raise ValueError("cross must be finite (no NaN or Inf)")
    term = w @ c + damping * w
    term[:, dead] = 0.0
    return term


def dense_target_weight(weight: np.ndarray, gram: np.ndarray, cross: np.ndarray, percdamp: float) -> np.ndarray:
    """``W' = W (C + λI)(H + λI)⁻¹`` in float64: the weight whose usual problem is the dense-target problem."""
    return reconstruction_problem(weight, gram, percdamp, cross)[0]


def reconstruction_problem(
    weight: np.ndarray, gram: np.ndarray, percdamp: float, cross: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(W', H + λI)``: the usual problem ``tr((W' - Ŵ)(H + λI)(W' - Ŵ)ᵀ)`` that a solver minimises, with
    ``W' = W`` (dead inputs' columns zeroed) without ``cross``, the dense-target weight with it."""
    h, dead, damping = damped_gram(gram, percdamp)
    if cross is None:
        target = np.array(weight, dtype=np.float64, copy=True)
        target[:, dead] = 0.0
        return target, h
    term = dense_linear_term(weight, cross, dead, damping)
    try:
        return np.linalg.solve(h, term.T).T, h
    except np.linalg.LinAlgError as exc:
        raise ValueError("the dampened Gram matrix is singular; raise percdamp") from exc
