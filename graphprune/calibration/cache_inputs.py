"""Inputs an export takes that calibration and evaluation fill in themselves: empty caches, positions, segments.

Hugging Face / Optimum (``text-generation-with-past``) and onnxruntime-genai decoders take the key/value cache of
earlier tokens as ``past_key_values.N.key`` / ``.value`` inputs ``[batch, kv_heads, past_len, head_dim]`` (and
return ``present.N.*``), and often ``position_ids`` (and ``cache_position``). Run over whole windows, the cache is
empty: past length 0. BERT-family encoders take ``token_type_ids``, the segment of each token, all zeros for one
text. :func:`complete_feed` adds every such input a feed lacks, shaped from the token ids; it is the one place
every command (apply, shrink, calibrate, eval) fills them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from graphprune.calibration.signature import InputSpec
from graphprune.errors import GraphpruneError, a_few

_CACHE_PREFIXES = ("past_key_values", "past_key", "past_value", "past.", "cache.")
POSITIONS = ("position_ids", "cache_position")
SEGMENTS = ("token_type_ids",)  # one text per sample: segment 0 everywhere


def is_cache(spec: InputSpec) -> bool:
    """Whether ``spec`` is a key/value cache input (fed empty)."""
    return spec.name.startswith(_CACHE_PREFIXES)


def fillable(spec: InputSpec) -> bool:
    """Whether :func:`complete_feed` can make this input: a cache, a position or a segment input."""
    return is_cache(spec) or spec.name in POSITIONS or spec.name in SEGMENTS


def provided(specs: Sequence[InputSpec]) -> list[InputSpec]:
    """The inputs the calibration data must provide itself (every input but the caches)."""
    return [s for s in specs if not is_cache(s)]


def complete_feed(feed: Mapping[str, np.ndarray], specs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    """``feed`` plus an empty cache for every cache input it lacks, positions 0..n-1 and segments 0 where they are
    missing."""
    missing = [s for s in specs if s.name not in feed and fillable(s)]
    out = dict(feed)
    if not missing:
        return out
    batch, length = _batch_and_length(feed)
    for spec in missing:
        if spec.name in POSITIONS:
            positions = np.arange(length, dtype=spec.dtype)
            rank = 1 if spec.dims is None else len(spec.dims)
            out[spec.name] = positions if rank == 1 else np.broadcast_to(positions, (batch, length)).copy()
        elif spec.name in SEGMENTS:
            out[spec.name] = np.zeros((batch, length), dtype=spec.dtype)
        else:
            out[spec.name] = np.zeros(_empty_cache_shape(spec, batch), dtype=spec.dtype)
    return out


def _batch_and_length(feed: Mapping[str, np.ndarray]) -> tuple[int, int]:
    """Batch and sequence length from the token ids (``input_ids``, else the first 2-D integer array)."""
    ids = feed.get("input_ids")
    if ids is None:
        ids = next(
            (a for a in feed.values() if np.ndim(a) == 2 and np.issubdtype(np.asarray(a).dtype, np.integer)), None
        )
    if ids is None or np.ndim(ids) != 2:
        raise GraphpruneError(
            f"cannot fill the cache and position inputs: no [batch, sequence] token ids among {a_few(list(feed))}"
        )
    return int(np.shape(ids)[0]), int(np.shape(ids)[1])


def _empty_cache_shape(spec: InputSpec, batch: int) -> tuple[int, ...]:
    """Axis 0 is the batch, fixed axes keep their size, every other (dynamic) axis is the empty past: 0."""
    if spec.dims is None:
        raise GraphpruneError(f"cache input {spec.name} has no declared rank: cannot make an empty cache for it")
    return tuple(
        batch if axis == 0 else (d if isinstance(d, int) and d > 0 else 0) for axis, d in enumerate(spec.dims)
    )
