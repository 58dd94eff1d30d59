"""Solver inputs drawn from a seed: a weight with the Gram matrix of LLM-like activations, a random N:M keep-mask.
Shared by the numpy and PyTorch GPTQ tests."""

from __future__ import annotations

import numpy as np

from graphprune.algorithms.pattern import NMPattern


def correlated_layer(seed: int, rows: int = 12, k: int = 48, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """A weight and the Gram matrix of correlated inputs with a few large channels, as in LLM activations."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) * 0.4 + np.eye(k)
    x = rng.standard_normal((n, k)) @ mix
    x[:, rng.choice(k, 3, replace=False)] *= 8.0
    w = rng.standard_normal((rows, k)).astype(np.float32)
    return w, x.T @ x


def random_nm_keep(w: np.ndarray, pattern: NMPattern, seed: int) -> np.ndarray:
    """A random N:M keep-mask (not the magnitude one, so that nothing depends on the weights' order)."""
    rng = np.random.default_rng(seed)
    order = np.argsort(rng.random((w.shape[0], w.shape[1] // pattern.group, pattern.group)), axis=-1)
    return (order < pattern.keep).reshape(w.shape)
