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

from graphprune.errors import GraphpruneError, a_few

if TYPE_CHECKING:
    import onnxruntime as ort

    from graphprune.calibration.signature import InputSpec

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


def open_session(model: str | Path | ort.InferenceSession) -> ort.InferenceSession:
    """An ONNX Runtime CPU session for ``model`` (a path, or a session passed through), with one-line errors."""
    import onnxruntime as ort

    if isinstance(model, ort.InferenceSession):
        return model
    path = Path(model)
    if not path.is_file():
        raise GraphpruneError(f"model not found: {path}")
    from graphprune.calibration.providers import session_options

    try:
        return ort.InferenceSession(str(path), session_options(optimize=True), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
        raise GraphpruneError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from None


def perplexity(
    model: str | Path | ort.InferenceSession,
    windows: np.ndarray,
    attention: bool = True,
    progress: Progress | None = None,
) -> float:
    """exp(mean NLL of tokens 1..L of every window, each predicted from the tokens before it).

    ``windows`` is int64 ``(n, L + 1)``; the model sees tokens 0..L-1 of each window, one window per run.
    With ``attention`` an all-ones ``attention_mask`` is fed when the model declares that input; exports with a
    key/value cache get empty caches (past length 0) and ``position_ids`` (see :class:`WindowFeeder`).
    The model's token input is ``input_ids`` (else its first input); its output ``logits`` (else its first),
    shaped ``(1, L, vocab)``.
    """
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[1] < 2 or windows.shape[0] == 0:
        raise GraphpruneError(f"windows must be (n, L + 1) with n >= 1 and L >= 1, got {windows.shape}")
    if not np.issubdtype(windows.dtype, np.integer) or (windows < 0).any():
        raise GraphpruneError(f"windows must hold non-negative integer token ids, got {windows.dtype} values")
    windows = windows.astype(np.int64, copy=False)
    session = open_session(model)
    feeder = WindowFeeder(session, attention)
    total, count = 0.0, 0
    n = windows.shape[0]
    for index, window in enumerate(windows):
        context, targets = window[None, :-1], window[1:]
        try:
            (logits,) = session.run([feeder.logits], feeder.feed(context))
        except Exception as exc:  # onnxruntime's own exception types: a model that cannot run these ids
            raise GraphpruneError(f"the model fails on window {index}: {str(exc).splitlines()[0]}") from None
        if logits.shape[:2] != context.shape or logits.ndim != 3:
            raise GraphpruneError(
                f"logits shaped {logits.shape} for input {context.shape}: expected (1, L, vocab)"
            )
        if (targets >= logits.shape[2]).any():
            raise GraphpruneError(
                f"token id {int(targets.max())} is outside the model's vocabulary ({logits.shape[2]})"
            )
        total += float(nll_from_logits(logits[0], targets).sum())
        count += targets.size
        del logits
        if progress is not None:
            progress(index + 1, n)
    return math.exp(total / count)


def load_token_windows(path: Path, count: int | None = None) -> np.ndarray:
    """The ``input_ids`` array ``(n, L + 1)`` of an ``.npz`` of token windows (at most ``count`` of them)."""
    import zipfile

    if not path.is_file():
        raise GraphpruneError(f"{path}: no such file")
    if count is not None and count < 1:
        raise GraphpruneError(f"`count` must be at least 1, got {count}")
    try:
        from graphprune.calibration.data import open_npz

        with open_npz(path, "token windows") as data:
            if "input_ids" not in data.files:
                raise GraphpruneError(
                    f"{path}: no input_ids array (it holds {', '.join(data.files[:3]) or 'none'})"
                )
            ids = data["input_ids"][:count]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        reason = "not an .npz archive" if "pickle" in str(exc) else (str(exc).splitlines() or ["unreadable"])[0]
        raise GraphpruneError(f"cannot read token windows from {path}: {reason}") from None
    if ids.ndim != 2 or ids.shape[1] < 2 or ids.shape[0] == 0:
        raise GraphpruneError(f"{path}: input_ids must be (n, L + 1) with n >= 1 and L >= 1, got {ids.shape}")
    return ids


def text_windows(
    token_ids: np.ndarray, seqlen: int, count: int | None = None, offset: int = 0, bos_id: int | None = None
) -> np.ndarray:
    """Non-overlapping windows of ``seqlen`` tokens from ``token_ids[offset:]``, at most ``count`` of them.

    With ``bos_id`` each window gets BOS in front: ``(n, seqlen + 1)``, and perplexity scores all ``seqlen``
    tokens. Without it, ``(n, seqlen)`` and the first token of each window is context only.
    """
    if seqlen < 1:
        raise GraphpruneError(f"`seqlen` must be at least 1, got {seqlen}")
    if offset < 0:
        raise GraphpruneError(f"`offset` must be non-negative, got {offset}")
    tokens = np.asarray(token_ids, dtype=np.int64)[offset:]
    n = tokens.size // seqlen if count is None else min(count, tokens.size // seqlen)
    if n == 0:
        raise GraphpruneError(f"the text has {tokens.size} tokens after offset {offset}: fewer than one window")
    windows = tokens[: n * seqlen].reshape(n, seqlen)
    if bos_id is None:
        return windows
    return np.concatenate([np.full((n, 1), bos_id, np.int64), windows], axis=1)


def find_bos(tokenizer_path: Path, name: str | None = None) -> tuple[int, str] | None:
    """The BOS token's (id, text): ``name`` if given, else ``bos_token`` of a ``tokenizer_config.json`` beside
    the tokenizer, else the first special token of the tokenizer's single-sequence template (BERT's [CLS])."""
    import json

    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    except Exception as exc:  # the tokenizers package raises plain Exceptions for unreadable files
        raise GraphpruneError(f"cannot read tokenizer {tokenizer_path}: {str(exc).splitlines()[0]}") from None
    if name is None:
        config = tokenizer_path.with_name("tokenizer_config.json")
        if config.exists():
            bos = json.loads(config.read_text()).get("bos_token")
            name = bos.get("content") if isinstance(bos, dict) else bos
    if name is None:
        template = json.loads(tokenizer.to_str()).get("post_processor") or {}
        first = (template.get("single") or [{}])[0]
        name = first.get("SpecialToken", {}).get("id")
    if name is None:
        return None
    token_id = tokenizer.token_to_id(name)
    if token_id is None:
        raise GraphpruneError(f"BOS token {name!r} is not in the tokenizer {tokenizer_path}")
    return token_id, name


class WindowFeeder:
    """The feed of one window for a causal LM session: token ids, and whatever else a decoder export takes.

    Hugging Face / Optimum (``text-generation-with-past``) and onnxruntime-genai exports take the key/value cache
    of earlier tokens (``past_key_values.N.key``/``.value`` ``[batch, kv_heads, past_len, head_dim]``): a whole
    window is scored from an empty cache, past length 0, with positions 0..L-1 and an all-ones mask, filled in by
    :func:`graphprune.calibration.cache_inputs.complete_feed` as calibration fills them.
    """

    def __init__(self, session: ort.InferenceSession, attention: bool = True) -> None:
        from graphprune.calibration.cache_inputs import fillable

        self.specs = session_specs(session)
        by_name = {s.name: s for s in self.specs}
        outputs = [o.name for o in session.get_outputs()]
        self.ids = "input_ids" if "input_ids" in by_name else self.specs[0].name
        self.logits = "logits" if "logits" in outputs else outputs[0]
        self.mask = attention and "attention_mask" in by_name
        given = [self.ids, *(["attention_mask"] if self.mask else [])]
        unfed = [s.name for s in self.specs if s.name not in given and not fillable(s)]
        if unfed:
            raise GraphpruneError(f"model takes inputs perplexity cannot fill: {a_few(unfed)}")
        for spec in self.specs:
            integer = spec.name in given or spec.name in ("position_ids", "cache_position")
            if integer and not np.issubdtype(spec.dtype, np.integer):
                raise GraphpruneError(f"model input {spec.name} is {spec.dtype}, expected integer ids")

    def feed(self, context: np.ndarray) -> dict[str, np.ndarray]:
        """``context`` is ``(1, L)`` int64 token ids."""
        from graphprune.calibration.cache_inputs import complete_feed

        by_name = {s.name: s for s in self.specs}
        feed = {self.ids: context.astype(by_name[self.ids].dtype, copy=False)}
        if self.mask:
            feed["attention_mask"] = np.ones(context.shape, by_name["attention_mask"].dtype)
        return complete_feed(feed, self.specs)


def session_specs(session: ort.InferenceSession) -> list[InputSpec]:
    """The inputs of an ONNX Runtime session as the calibration signature describes them."""
    from graphprune.calibration.signature import InputSpec

    specs = []
    for arg in session.get_inputs():
        shape = arg.shape
        dims = None if shape is None else tuple(d if isinstance(d, int) else (d or None) for d in shape)
        specs.append(InputSpec(arg.name, _dtype(arg), dims))
    return specs


def _dtype(arg: object) -> np.dtype:
    """numpy dtype of an ONNX Runtime input (``tensor(float16)`` -> float16)."""
    text = str(getattr(arg, "type", "")).removeprefix("tensor(").removesuffix(")")
    names = {"float": "float32", "double": "float64", "bool": "bool"}
    try:
        if text == "bfloat16":
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(names.get(text, text))
    except TypeError:
        raise GraphpruneError(f"model input {getattr(arg, 'name', '?')} has an unsupported type {text}") from None
