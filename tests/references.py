"""Numpy references and test data shared by several test modules (no test module imports another)."""

from __future__ import annotations

import numpy as np

from tests.onnx_builders import reference_nm_mask


def wanda_numpy(w_kn: np.ndarray, inputs: np.ndarray) -> np.ndarray:
    """Independent Wanda 2:4 on a [K, N] MatMul weight: |W|·‖X_j‖, top 2 of every 4 along K (no ties)."""
    norms = np.sqrt((inputs.astype(np.float64) ** 2).reshape(-1, inputs.shape[-1]).sum(axis=0))
    scores = np.abs(w_kn.astype(np.float64)) * norms[:, None]
    groups = scores.T.reshape(w_kn.shape[1], -1, 4)
    order = np.argsort(-groups, axis=-1)[..., :2]
    keep = np.zeros(groups.shape, bool)
    np.put_along_axis(keep, order, True, axis=-1)
    return np.where(keep.reshape(w_kn.shape[1], -1).T, w_kn, 0)


def correlated_inputs(rng: np.random.Generator, k: int, rows: int = 256, corr: float = 0.7) -> np.ndarray:
    """Calibration rows with correlated channels (AR(1), shuffled) of very different scales, as in an LLM."""
    cov = corr ** np.abs(np.subtract.outer(np.arange(k), np.arange(k)))
    x = (rng.standard_normal((rows, k)) @ np.linalg.cholesky(cov).T)[:, rng.permutation(k)]
    return x * rng.gamma(2.0, 1.0, size=k)


def sparse_24(shape: tuple[int, ...], k_axis: int, seed: int = 0) -> np.ndarray:
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return w * reference_nm_mask(w, k_axis, 2, 4)
