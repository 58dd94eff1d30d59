"""ALPS (Meng, Behdin, Wang, Mazumder; NeurIPS 2024): layer-wise pruning by ADMM on the normalised Gram matrix.

Problem, in the canonical ``(out, K)`` layout with ``H = Σ xᵀx`` over the calibration rows::

    minimise  tr((W - Ŵ) H (W - Ŵ)ᵀ)  =  ‖(W - Ŵ) Xᵀ‖²_F     over Ŵ with the sparsity pattern

Steps, as the paper (and its code, mazumder-lab/ALPS ``ALPS_admm``) does them:

1. damping: ``H += λ I`` with ``λ = percdamp · mean(diag H)`` (0.01, as the reference);
2. normalisation: ``d = √diag H``, ``Ĥ = D⁻¹ H D⁻¹`` (unit diagonal) and ``W̃ = W D``, so one penalty rho suits
   every layer and the magnitude of ``W̃`` (``|W_ij|·√H_jj``, Wanda-like) chooses the masks;
3. ADMM on ``min f(B) + 1_pattern(Z)`` s.t. ``B = Z``, with ``f(B) = tr((B - W̃) Ĥ (B - W̃)ᵀ)``:
   ``B = (W̃ Ĥ - V + rho Z)(Ĥ + rhoI)⁻¹`` (one eigendecomposition of Ĥ serves every rho),
   ``Z = Π(B + V/rho)`` (the pattern's projection: keep the largest magnitudes), ``V += rho (B - Z)``;
   initial ``Z = Π(W̃)``, ``V = 0``, ``rho = 0.1``;
4. the rho schedule, every 3 iterations, from the support change s (positions that entered or left the support
   since the last check) over the kept count: s > 10 %: rho x 1.3; s > 0.5 %: rho x 1.2; s > 0: rho x 1.1 once rho
   has started to grow, else rho / 5 and a restart from the initial point (rho was too large to explore); s = 0:
   stop once rho has grown, else rho / 5. rho ≤ 10⁶;
5. stopping rule: after at least 30 iterations, stop once s < 0.03 % of the kept count (or at 300);
6. the final support is Π(B), and the kept weights are refitted on it: each row's least squares on its own
   support, ``Ĥ_SS b_S = (W̃ Ĥ)_S``, by 10 steps of conjugate gradients batched over rows, from B (exactly,
   by a solve per row, where K is small), then ``Ŵ = B D⁻¹``.

Deviations from the reference code, on purpose:

* Inputs that never fired (``H_jj = 0``) get ``H_jj = 1`` and their weights zeroed, as our SparseGPT does, so
  a layer whose statistics are all zero still has a finite normalisation.
* Unstructured patterns honour the comparison scope (each row by default, as ``--scope`` says; the reference
  compares the whole layer, our ``Scope.LAYER``); counts are those of :mod:`~graphprune.algorithms.masks`.
* Where ``K ≤ exact_max_k`` the refit solves exactly (the optimum CG approaches).
* The reference evaluates the reconstruction error at every check only to log it; not done here.
* ADMM and CG run in float32, as the reference; the normalisation and the eigendecomposition in float64.
* One eigendecomposition serves every weight that reads the same input (:class:`PreparedGram`), e.g. Q/K/V,
  and where the pattern's masks are chosen row by row (N:M, unstructured per output row) those weights are
  solved as one stacked layer (:func:`alps_solve_shared`): each row's problem is the same, but the rho
  schedule and the stopping rule follow the support change of all their rows together, where the reference
  runs them per weight (what that costs and saves: BENCHMARKS.md, "Figures moved out of the code").
* ``(Ĥ + rhoI)⁻¹`` is formed as ``S Sᵀ`` (one triangle, a BLAS rank-K update) rather than ``Q diag Qᵀ``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from graphprune.algorithms.arrays import choose_ops
from graphprune.algorithms.dense_target import damped_gram, dense_linear_term
from graphprune.algorithms.masks import mask_from_scores
from graphprune.algorithms.pattern import NMPattern, Pattern, Scope, Unstructured

RHO_START = 0.1
RHO_MAX = 1e6
GROWTH = (1.3, 1.2, 1.1)  # rho's factor for a large, medium, small support change
CHECK_EVERY = 3
MIN_ITERATIONS = 30
MAX_ITERATIONS = 300
SETTLED = 3e-4  # support change (fraction of the kept count) below which the support has settled
EXACT_MAX_K = 128  # refit by direct solves up to this K; CG beyond
CG_TOLERANCE = 1e-4  # relative residual per row, as the reference
CG_MAX_STEPS = 10  # as the reference: more steps fit the damped objective closer, not the real error


@dataclass(kw_only=True)
class AlpsResult:
    """The pruned weight (in the input's dtype), its keep-mask, and how the solver got there."""

    weight: np.ndarray
    keep: np.ndarray
    iterations: int
    rho: float
    refit_steps: int  # CG steps of the refit (0 for the exact solve)
    device: str


class PreparedGram:
    """What ALPS needs of one Gram matrix, computed once for every weight that reads the same input.

    ``h_hat``: the damped, normalised Gram matrix (float64, numpy); ``scale``: ``√diag`` of the damped one;
    ``dead``: inputs that never fired; and, on the solver's backend, Ĥ in float32 and its eigendecomposition.
    """

    def __init__(self, gram: np.ndarray, percdamp: float = 0.01, device: str = "auto") -> None:
        if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
            raise ValueError(f"gram must be a square (K, K) matrix, got shape {gram.shape}")
        if not np.isfinite(gram).all():
            raise ValueError("gram must be finite (no NaN or Inf)")
        if not percdamp >= 0.0:
            raise ValueError(f"percdamp must be >= 0, got {percdamp}")
        self.ops = choose_ops(device)
        h, self.dead, self.damping = damped_gram(gram, percdamp)  # λ: dense targets damp their linear term alike
        self.scale = np.sqrt(np.diag(h))
        self.h_hat = h / self.scale[:, None] / self.scale[None, :]
        self.h32 = self.ops.asarray(self.h_hat, np.float32)
        eigenvalues, q = self.ops.eigh(self.ops.asarray(self.h_hat, np.float64))
        self.eigenvalues = self.ops.float32(eigenvalues.clip(min=0.0))
        self.q = self.ops.float32(q)

    def inverse(self, rho: float) -> Any:
        """``(Ĥ + rhoI)⁻¹ = S Sᵀ`` with ``S = Q diag(1 / √(L + rho))``, in float32 on the backend.

        ``S @ S.T`` lets the BLAS form only one triangle (a symmetric rank-K update): 35% less time than
        ``(Q / (L + rho)) @ Qᵀ``.
        """
        s = self.q * (1.0 / (self.eigenvalues + rho) ** 0.5)
        return s @ s.T


def alps(weight: np.ndarray, gram: np.ndarray | PreparedGram, pattern: Pattern, **options: Any) -> np.ndarray:
    """Pruned and updated copy of ``weight`` ``(out, K)``, zero where pruned (see the module docstring).

    ``gram`` is ``Σ xᵀx`` (any common scale gives the same result), or a :class:`PreparedGram` shared by the
    weights that read the same input (``percdamp`` and ``device`` are then its own). ``options`` are those of
    :func:`alps_solve`: ``percdamp``, ``max_iterations``, ``device`` (``"auto"``: a CUDA GPU through PyTorch
    when present, else numpy; ``"numpy"``; or a torch device string), ``exact_max_k``.
    """
    return alps_solve(weight, gram, pattern, **options).weight


def alps_solve(
    weight: np.ndarray,
    gram: np.ndarray | PreparedGram,
    pattern: Pattern,
    percdamp: float = 0.01,
    max_iterations: int = MAX_ITERATIONS,
    device: str = "auto",
    exact_max_k: int = EXACT_MAX_K,
    cross: np.ndarray | None = None,
) -> AlpsResult:
    """As :func:`alps`, with the keep-mask and the solver's record.

    ``cross``: the cross-Gram ``Σ x_denseᵀ x`` to aim at the dense model's outputs (:mod:`.dense_target`): the
    linear term ``W̃ Ĥ`` becomes ``W (C + λI) D⁻¹``, and the start its unconstrained optimum, that times ``Ĥ⁻¹``.
    """
    _check(weight, pattern)
    prepared = gram if isinstance(gram, PreparedGram) else PreparedGram(gram, percdamp, device)
    rows, k = weight.shape
    if prepared.h_hat.shape != (k, k):
        raise ValueError(f"gram must be (K, K) = ({k}, {k}) for weight {weight.shape}, got {prepared.h_hat.shape}")
    ops = prepared.ops
    if rows == 0 or k == 0:
        return AlpsResult(
            weight=weight.copy(),
            keep=np.ones(weight.shape, dtype=bool),
            iterations=0,
            rho=RHO_START,
            refit_steps=0,
            device=ops.name,
        )

    if cross is None:
        w0 = np.array(weight, dtype=np.float64)
        w0[:, prepared.dead] = 0.0
        w_tilde = w0 * prepared.scale  # W D
        target = w_tilde @ prepared.h_hat  # W̃ Ĥ: the constant part of every B-update and the refit's right side
    else:
        target = dense_linear_term(weight, cross, prepared.dead, prepared.damping) / prepared.scale
        w_tilde = np.linalg.solve(prepared.h_hat, target.T).T
    admm = _Admm(prepared, w_tilde, target, pattern)
    b, iterations = admm.run(max_iterations)

    keep = mask_from_scores(np.abs(b), pattern)  # the final support, with the deterministic tie rule
    if k <= exact_max_k:
        refitted, steps = _refit_exact(prepared.h_hat, target, keep), 0
    else:
        refitted, steps = _refit_cg(prepared, target, keep, b)
    refitted = np.where(keep, refitted / prepared.scale, 0.0)
    return AlpsResult(
        weight=refitted.astype(weight.dtype),
        keep=keep,
        iterations=iterations,
        rho=admm.rho,
        refit_steps=steps,
        device=ops.name,
    )


def alps_solve_shared(
    weights: Sequence[np.ndarray], gram: np.ndarray | PreparedGram, pattern: Pattern, **options: Any
) -> list[AlpsResult]:
    """:func:`alps_solve` for weights that read the same input (Q/K/V, gate/up), in their order.

    Where the pattern chooses each row's mask on its own (N:M, or unstructured per output row) the weights'
    rows are stacked and solved as one layer: one ADMM, one (Ĥ + rho I)⁻¹ per rho for all of them and larger
    products, each row's problem unchanged; only the rho schedule then follows the support change of all the
    rows together. Otherwise (a comparison group across rows) each is solved alone on the shared Gram.
    """
    weights = list(weights)
    prepared = gram if isinstance(gram, PreparedGram) else PreparedGram(
        gram, options.pop("percdamp", 0.01), options.pop("device", "auto")
    )  # fmt: skip
    row_local = isinstance(pattern, NMPattern) or (
        isinstance(pattern, Unstructured) and pattern.scope is Scope.OUTPUT
    )
    if len(weights) < 2 or not row_local:
        return [alps_solve(w, prepared, pattern, **options) for w in weights]
    for w in weights:
        _check(w, pattern)
    stacked = np.concatenate([np.asarray(w, dtype=np.float64) for w in weights])
    joint = alps_solve(stacked, prepared, pattern, **options)
    starts = np.cumsum([0] + [w.shape[0] for w in weights])
    return [
        replace(joint, weight=joint.weight[a:b].astype(w.dtype), keep=joint.keep[a:b])
        for w, a, b in zip(weights, starts[:-1], starts[1:], strict=True)
    ]


class _Admm:
    """The ADMM iterations of steps 3-5 on one layer, in float32 on the prepared Gram's backend."""

    def __init__(self, prepared: PreparedGram, w_tilde: np.ndarray, target: np.ndarray, pattern: Pattern) -> None:
        self.prepared, self.ops, self.pattern = prepared, prepared.ops, pattern
        self.w_tilde = self.ops.asarray(w_tilde, np.float32)
        self.target = self.ops.asarray(target, np.float32)
        rows, k = w_tilde.shape
        if isinstance(pattern, NMPattern):
            self.kept = rows * k * pattern.keep // pattern.group
        else:
            self.kept = max(1, int(np.count_nonzero(mask_from_scores(np.ones((rows, k)), pattern))))
        self.rho = RHO_START

    def _project(self, x: Any) -> tuple[Any, Any]:
        keep = self.ops.keep_mask(abs(x), self.pattern)
        return self.ops.where(keep, x), keep

    def run(self, max_iterations: int) -> tuple[np.ndarray, int]:
        ops = self.ops
        z0, support0 = self._project(self.w_tilde)
        b, z, v = ops.copy(self.w_tilde), ops.copy(z0), ops.zeros_like(self.w_tilde)
        last_support = support0
        inverse = self.prepared.inverse(self.rho)
        grown = False
        iterations = 0
        for i in range(max_iterations):
            iterations = i + 1
            rhs = self.rho * z
            rhs -= v
            rhs += self.target
            b = rhs @ inverse
            v /= self.rho  # V/rho for the projection's argument, then back
            v += b
            z, support = self._project(v)
            v -= z
            v *= self.rho  # V + rho(B - Z)
            if iterations % CHECK_EVERY:
                continue
            change = int((support != last_support).sum())
            share = change / self.kept
            last_support = support
            if share > 0.1:
                grown, self.rho = True, self.rho * GROWTH[0]
            elif share > 0.005:
                grown, self.rho = True, self.rho * GROWTH[1]
            elif change > 0:
                if grown:
                    self.rho *= GROWTH[2]
                else:  # rho started too large to explore: smaller, from the start again
                    self.rho /= 5
                    b, z, v = ops.copy(self.w_tilde), ops.copy(z0), ops.zeros_like(self.w_tilde)
            elif grown:
                break
            else:
                self.rho /= 5
            self.rho = min(self.rho, RHO_MAX)
            inverse = self.prepared.inverse(self.rho)
            if iterations >= MIN_ITERATIONS and share < SETTLED:
                break
        return ops.to_numpy(b).astype(np.float64), iterations


def _refit_exact(h_hat: np.ndarray, target: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Each row's least squares on its support: ``Ĥ_SS b_S = (W̃ Ĥ)_S``."""
    out = np.zeros_like(target)
    for r in range(target.shape[0]):
        s = np.flatnonzero(keep[r])
        if s.size:
            out[r, s] = np.linalg.solve(h_hat[np.ix_(s, s)], target[r, s])
    return out


def _refit_cg(
    prepared: PreparedGram, target: np.ndarray, keep: np.ndarray, start: np.ndarray
) -> tuple[np.ndarray, int]:
    """The same least squares by conjugate gradients, all rows at once, from the ADMM point on the support."""
    ops, h = prepared.ops, prepared.h32
    mask = ops.asarray(keep, np.float32)
    rhs = ops.asarray(target, np.float32) * mask
    x = ops.asarray(np.where(keep, start, 0.0), np.float32)
    r = rhs - (x @ h) * mask
    p = ops.copy(r)
    rr = ops.row_dot(r, r)
    limit = (CG_TOLERANCE**2) * ops.row_dot(rhs, rhs)
    steps = 0
    for steps in range(1, CG_MAX_STEPS + 1):  # noqa: B007 (the count is reported)
        hp = (p @ h) * mask
        curvature = ops.row_dot(p, hp)
        alpha = rr / (curvature + (curvature == 0))  # rows already solved have p = 0
        x += alpha * p
        r -= alpha * hp
        rr_next = ops.row_dot(r, r)
        if bool((rr_next <= limit).all()):
            break
        p = r + (rr_next / (rr + (rr == 0))) * p
        rr = rr_next
    return ops.to_numpy(x).astype(np.float64), steps


def _check(weight: np.ndarray, pattern: Pattern) -> None:
    if weight.ndim != 2:
        raise ValueError(f"weight must be (out, K), got shape {weight.shape}")
    k = weight.shape[1]
    if not isinstance(pattern, NMPattern | Unstructured):
        raise TypeError(f"unsupported pattern {pattern!r}")
    if isinstance(pattern, NMPattern) and k % pattern.group:
        raise ValueError(f"K={k} is not a multiple of the group size {pattern.group}")
    if not np.isfinite(np.asarray(weight, dtype=np.float64)).all():
        raise ValueError("weight must be finite (no NaN or Inf)")
