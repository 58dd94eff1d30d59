"""Language-model quality: perplexity of an ONNX causal LM on fixed token windows, with bounded memory.

The model runs in ONNX Runtime one window at a time; the log-softmax is taken in float64 a few rows at a
time, so only one window's logits are ever held.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from graphprune.errors import GraphpruneError

if TYPE_CHECKING:
    import onnxruntime as ort

Progress = Callable[[int, int], None]
"""Called as ``progress(windows_done, windows_total)`` after each window."""

_ROWS_PER_CHUNK = 64


def nll_from_logits(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each target under the softmax of its row of logits, in float64.

    ``logits`` is ``(T, V)``, ``targets`` is ``(T,)`` integer ids; returns ``(T,)``.
    """
    logits = np.asarray(logits)
    targets = np.asarray(targets)
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"logits (T, V) and targets (T,) expected, got {logits.shape} and {targets.shape}")
    out = np.empty(logits.shape[0], dtype=np.float64)
    for start in range(0, logits.shape[0], _ROWS_PER_CHUNK):
        rows = logits[start : start + _ROWS_PER_CHUNK].astype(np.float64)
        peak = rows.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(rows - peak).sum(axis=1)) + peak[:, 0]
        picked = np.take_along_axis(rows, targets[start : start + _ROWS_PER_CHUNK, None], axis=1)[:, 0]
        out[start : start + _ROWS_PER_CHUNK] = log_norm - picked
    return out


def _session(model: str | Path | ort.InferenceSession) -> ort.InferenceSession:
    import onnxruntime as ort

    if isinstance(model, ort.InferenceSession):
        return model
    path = Path(model)
    if not path.is_file():
        raise GraphpruneError(f"model not found: {path}")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def perplexity(
    model: str | Path | ort.InferenceSession,
    windows: np.ndarray,
    attention: bool = True,
    progress: Progress | None = None,
) -> float:
    """exp(mean NLL of tokens 1..L of every window, each predicted from the tokens before it).

    ``windows`` is int64 ``(n, L + 1)``; the model sees tokens 0..L-1 of each window, one window per run.
    With ``attention`` an all-ones ``attention_mask`` is fed when the model declares that input.
    The model's token input is ``input_ids`` (else its first input); its output ``logits`` (else its first),
    shaped ``(1, L, vocab)``.
    """
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[1] < 2 or windows.shape[0] == 0:
        raise GraphpruneError(f"windows must be (n, L + 1) with n >= 1 and L >= 1, got {windows.shape}")
    windows = windows.astype(np.int64, copy=False)
    session = _session(model)
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    ids_name = "input_ids" if "input_ids" in inputs else inputs[0]
    logits_name = "logits" if "logits" in outputs else outputs[0]
    feeds_mask = attention and "attention_mask" in inputs
    unfed = [name for name in inputs if name != ids_name and not (feeds_mask and name == "attention_mask")]
    if unfed:
        raise GraphpruneError(f"model takes inputs perplexity cannot fill: {', '.join(unfed)}")

    total, count = 0.0, 0
    n = windows.shape[0]
    for index, window in enumerate(windows):
        context, targets = window[None, :-1], window[1:]
        feed = {ids_name: context}
        if feeds_mask:
            feed["attention_mask"] = np.ones_like(context)
        (logits,) = session.run([logits_name], feed)
        if logits.shape[:2] != context.shape:
            raise GraphpruneError(f"logits shaped {logits.shape} for input {context.shape}")
        total += float(nll_from_logits(logits[0], targets).sum())
        count += targets.size
        del logits
        if progress is not None:
            progress(index + 1, n)
    return math.exp(total / count)
