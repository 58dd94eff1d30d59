"""Validation of a statistics file's contents: edited metadata, arrays of the wrong shape, NaN, negative sums.

A statistics file is input like any other: its metadata must be consistent with itself (the fingerprint is a
digest of the names, shapes and K axes it lists, so an edit that forgets the fingerprint is caught), and every
array must be what the metadata says, finite, and (for Σx²) non-negative.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from graphprune.errors import GraphpruneError, a_few

# Every field of the metadata and the JSON type it must have; the optional ones may be absent.
FIELDS: dict[str, type] = {
    "format": str,
    "version": int,
    "model_fingerprint": str,
    "names": list,
    "rows": list,
    "shapes": list,
    "k_axes": list,
    "gram_of": dict,
    "warnings": list,
}
OPTIONAL = ("gram_of", "warnings")


def check_meta(meta: Any, path: Path, format_name: str, version: int) -> None:
    """The metadata's structure: every field of its type, the format and a version this code reads, and names,
    rows, shapes, K axes and Gram indices that agree with each other."""

    def bad(what: str) -> GraphpruneError:
        return GraphpruneError(f"{path}: the statistics metadata is corrupt or was edited ({what})")

    if not isinstance(meta, dict) or meta.get("format") != format_name:
        raise GraphpruneError(f"{path} is not a graphprune statistics file")
    for key, kind in FIELDS.items():
        if key not in meta:
            if key in OPTIONAL:
                continue
            raise bad(f"no {key.replace('_', ' ')}")
        value = meta[key]
        if not isinstance(value, kind) or isinstance(value, bool):  # JSON true is a Python int too
            raise bad(f"{key} is {type(value).__name__} {value!r:.40}, expected {kind.__name__}")
    if meta["version"] > version:
        raise GraphpruneError(f"{path} was written by a newer graphprune (format {meta['version']})")
    if meta["version"] < 1:
        raise bad(f"version {meta['version']} is not a format version")
    if not all(isinstance(w, str) for w in meta.get("warnings", [])):
        raise bad("warnings must be strings")
    names, rows, shapes, k_axes = (meta.get(key) for key in ("names", "rows", "shapes", "k_axes"))
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise bad("names must be distinct strings")
    for key, value in (("rows", rows), ("shapes", shapes), ("k_axes", k_axes)):
        if not isinstance(value, list) or len(value) != len(names):
            raise bad(f"{key} must list one entry per name ({len(names)})")
    assert rows is not None and shapes is not None and k_axes is not None  # lists: checked just above
    if not all(_count(r) for r in rows):
        raise bad("rows must be non-negative integers")
    for shape, k in zip(shapes, k_axes, strict=True):
        if not isinstance(shape, list) or not shape or not all(_count(d) and d > 0 for d in shape):
            raise bad(f"shape {shape!r} is not a list of positive integers")
        if not _count(k) or k >= len(shape):
            raise bad(f"K axis {k!r} is not an axis of shape {shape}")
    gram_of = meta.get("gram_of", {})
    if not isinstance(gram_of, dict) or not all(n in names and _count(j) for n, j in gram_of.items()):
        raise bad("gram_of must map listed names to Gram numbers")


def check_arrays(
    meta: dict, sumsq: Mapping[str, np.ndarray], grams: Mapping[int, np.ndarray], fingerprint: str, path: Path
) -> None:
    """Every array matches the metadata and holds usable numbers; the fingerprint matches the metadata."""
    if fingerprint != meta["model_fingerprint"]:
        raise GraphpruneError(
            f"{path}: the statistics metadata was edited (its names, shapes or K axes no longer match its model "
            "fingerprint); calibrate again"
        )
    k_of = {n: s[k] for n, s, k in zip(meta["names"], meta["shapes"], meta["k_axes"], strict=True)}
    for name, values in sumsq.items():
        if values.shape != (k_of[name],) or not np.issubdtype(values.dtype, np.floating):
            raise GraphpruneError(
                f"{path}: Σx² of {name} is {values.dtype}{list(values.shape)}, expected float[{k_of[name]}] "
                "(corrupt file)"
            )
        if not np.isfinite(values).all() or (values < 0).any():
            raise GraphpruneError(f"{path}: Σx² of {name} holds NaN, infinite or negative values; calibrate again")
    for name, j in meta.get("gram_of", {}).items():
        gram, k = grams[j], k_of[name]
        if gram.shape != (k, k) or not np.issubdtype(gram.dtype, np.floating):
            raise GraphpruneError(
                f"{path}: the Gram matrix of {name} is {gram.dtype}{list(gram.shape)}, expected float[{k}, {k}] "
                "(corrupt file)"
            )
    for j, gram in grams.items():
        if not np.isfinite(gram).all():
            raise GraphpruneError(f"{path}: Gram matrix {j} holds NaN or infinite values; calibrate again")


def refuse_non_finite(arrays: Mapping[str, Any], nothing_written: bool = False) -> None:
    """One line naming the tensors whose statistics hold NaN or infinity (activations that overflowed, or NaN in
    the data): no method can score or reconstruct with them, so they stop the run."""
    bad = [name for name, values in arrays.items() if not np.isfinite(np.asarray(values, dtype=np.float64)).all()]
    if bad:
        tail = "; nothing was written" if nothing_written else ""
        raise GraphpruneError(
            f"the activations reaching {a_few(bad)} are not finite (NaN or infinity) on the calibration data: "
            f"check the data and the model's dtype{tail}"
        )


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
