"""Activation-aware weight scaling (AWQ, Lin et al. 2023): per input channel scales searched so that the weights,
multiplied by them before rounding, lose the least of the layer outputs.

Weight-only quantization keeps activations exact, so an exact rescaling ``x W = (x / s)(diag(s) W)`` changes only
what rounding does: a channel whose activations are large (its weights' errors cost the most output) gets its K row
multiplied by ``s_j > 1``, so its weights take more of their block's range and round relatively finer. AWQ's
scale is ``s = a^alpha`` with ``a`` the per channel activation magnitude and one alpha per group of weights that
read the same activation, chosen on a grid by the error the quantized weights leave. Here, on the canonical
``(out, K)`` layout:

1. ``a_j = sqrt(H_jj)``, the root of the Gram diagonal ``Σ x_j²`` (the reference uses mean |x_j|; the Gram is what
   GPTQ already has, and any common factor of ``a`` cancels in step 2);
2. ``s = a^alpha`` where ``a_j > 0`` (1 for a dead channel), divided by ``sqrt(max s · min s)`` as the
   reference does, so that the values folded into the model stay near 1 (a common factor of s changes no code);
3. the quantized weights seen from the original activation are ``Ŵ = Q(W·diag(s))·diag(s)⁻¹``, and the error of
   alpha is the layer output's squared error on the calibration rows, summed over the group's weights:
   ``Σ_W tr((W - Ŵ) H (W - Ŵ)ᵀ)`` (the reference runs the block forward and measures the output's MSE; the Gram
   gives the same sum of squares for one linear layer, without the activations);
4. the alpha of least error among :data:`ALPHAS` (0.0, 0.05, ..., 1.0) wins; alpha = 0 is ``s = 1``, plain
   rounding, so the chosen scales never leave a larger error than no scaling.

``Q`` rounds to nearest on the grid with the given clip search (:mod:`~graphprune.algorithms.clip_search`), the
scales of the scaled weight (``"hessian"``: on the scaled weights' Gram ``diag(s)⁻¹ H diag(s)⁻¹``). Multiplying a
K row by ``s_j`` keeps its zeros zero, so a pruned weight stays pruned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from graphprune.algorithms.clip_search import ClipMode, searched_scales
from graphprune.algorithms.quant_grid import QuantGrid, dequantize_codes, quantize_codes

ALPHAS = tuple(i / 20 for i in range(21))
_S_RANGE = (1e-4, 1e4)  # scales beyond would trade rounding for float32 range in the folded tensors


@dataclass(frozen=True)
class ScaleSearch:
    """The chosen scales ``(K,)`` (float64, positive), their alpha, and the error of each alpha tried, in order."""

    scales: np.ndarray
    alpha: float
    errors: tuple[float, ...]

    @property
    def unscaled_error(self) -> float:
        """The error of alpha = 0 (s = 1: rounding without scaling)."""
        return self.errors[0]

    @property
    def error(self) -> float:
        return min(self.errors)


def activation_scales(magnitude: np.ndarray, alpha: float) -> np.ndarray:
    """``magnitude^alpha`` (1 where the magnitude is 0), divided by ``sqrt(max · min)`` (step 2)."""
    a = np.asarray(magnitude, np.float64)
    s = np.ones_like(a)
    live = a > 0
    if not live.any():
        return s
    s[live] = np.power(a[live], alpha)
    s[live] /= np.sqrt(s[live].max() * s[live].min())
    return np.clip(s, *_S_RANGE)


def scaled_rounding(
    w: np.ndarray, s: np.ndarray, gram: np.ndarray, grid: QuantGrid, clip: ClipMode = "none"
) -> np.ndarray:
    """``Q(W·diag(s))·diag(s)⁻¹`` in float64: what the model computes from ``x`` once ``s`` is folded and the
    scaled float32 weight is rounded (``gram`` is ``x``'s, read by the ``"hessian"`` clip in scaled form)."""
    scaled = (np.asarray(w, np.float32) * s[None, :]).astype(np.float32)
    scaled_gram = gram / np.outer(s, s) if clip == "hessian" else None
    scales = searched_scales(scaled, grid, clip, scaled_gram)
    return dequantize_codes(quantize_codes(scaled, scales, grid), scales, grid).astype(np.float64) / s[None, :]


def search_scales(
    weights: Sequence[np.ndarray],
    gram: np.ndarray,
    grid: QuantGrid,
    clip: ClipMode = "none",
    alphas: Sequence[float] = ALPHAS,
) -> ScaleSearch:
    """The scales of the group ``weights`` (each canonical ``(out, K)``, all reading the activation whose Gram is
    ``gram`` ``(K, K)``): steps 1-4 of the module docstring. ``alphas`` must start with 0 (no scaling)."""
    if not alphas or alphas[0] != 0.0:
        raise ValueError("the alphas must start with 0.0, the unscaled rounding every search is compared with")
    gram = np.asarray(gram, np.float64)
    k = gram.shape[0]
    if gram.shape != (k, k) or any(np.shape(w) != (np.shape(w)[0], k) for w in weights):
        raise ValueError(f"every weight must be (out, {k}) for a ({k}, {k}) Gram matrix")
    magnitude = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    # the error's products in float32 on a normalised Gram: only the order of the errors decides
    norm = float(np.trace(gram)) / k or 1.0
    gram32 = (gram / norm).astype(np.float32)
    errors = []
    for alpha in alphas:
        s = activation_scales(magnitude, alpha)
        total = 0.0
        for w in weights:
            e = (np.asarray(w, np.float64) - scaled_rounding(w, s, gram, grid, clip)).astype(np.float32)
            total += float(np.einsum("rk,rk->", e @ gram32, e, dtype=np.float64)) * norm
        errors.append(total)
    best = int(np.argmin(errors))  # the first of equal errors: the smaller alpha
    return ScaleSearch(activation_scales(magnitude, alphas[best]), float(alphas[best]), tuple(errors))
