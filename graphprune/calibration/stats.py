"""Activation statistics per target weight, and the model fingerprint that says which model they belong to.

Saved as a plain ``.npz`` (no pickle): arrays ``sumsq_<i>`` and ``gram_<j>`` plus a JSON ``meta`` string that
holds the names, row counts, stored shapes, K axes and which Gram each weight uses (a Gram is stored once per
distinct array, so the weights that read the same activation share it on disk as in memory).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from graphprune.calibration.data import open_npz
from graphprune.calibration.stats_checks import check_arrays, check_meta, refuse_non_finite
from graphprune.errors import GraphpruneError, a_few
from graphprune.graph.targets import Target

FORMAT = "graphprune-activation-stats"
VERSION = 1


def fingerprint(targets: Sequence[Target]) -> str:
    """A digest of the targets' names, stored shapes and K axes (not of weight values: a pruned model matches)."""
    return _digest([(t.name, list(t.shape), t.k_axis) for t in targets])


def _digest(entries: list[tuple[str, list[int], int]]) -> str:
    return hashlib.sha256(json.dumps(sorted(entries), separators=(",", ":")).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class TargetInfo:
    """What the statistics know about the weight they were collected for."""

    shape: tuple[int, ...]
    k_axis: int

    @property
    def k(self) -> int:
        return self.shape[self.k_axis]


@dataclass(kw_only=True)
class ActivationStats:
    """Σx² per input channel (float64 ``[K]``) and rows seen, per target weight name; optional Grams XᵀX."""

    sumsq: dict[str, np.ndarray]
    rows: dict[str, int]
    targets: dict[str, TargetInfo]
    model_fingerprint: str
    gram: dict[str, np.ndarray] = field(default_factory=dict)  # float64 [K, K]; shared arrays for shared inputs
    warnings: list[str] = field(default_factory=list)
    cross: dict[str, np.ndarray] = field(default_factory=dict)  # Σ x_denseᵀ x [K, K] (dense targets; not saved)
    sums: dict[str, np.ndarray] = field(default_factory=dict)  # Σx [K] where asked for (shrink; not saved)
    dense_sums: dict[str, np.ndarray] = field(default_factory=dict)  # Σ x_dense [K] beside ``cross`` (not saved)
    # where the Gram matrix is from a sample of the rows (shrink's strided or padded rows): the sample's Σx and
    # row count, the refit's mean (not saved)
    gram_sums: dict[str, np.ndarray] = field(default_factory=dict)
    gram_rows: dict[str, int] = field(default_factory=dict)

    def __contains__(self, name: object) -> bool:
        return name in self.sumsq

    @classmethod
    def from_sumsq(
        cls,
        sumsq: Mapping[str, np.ndarray],
        targets: Sequence[Target],
        gram: Mapping[str, np.ndarray] | None = None,
    ) -> ActivationStats:
        """Statistics from a plain mapping of weight name -> Σx² per input channel (and Grams; rows unknown: 0).

        The shapes of ``targets`` are taken as the collected ones: :meth:`check` then compares the arrays.
        """
        known = [t for t in targets if t.name in sumsq]
        return cls(
            sumsq={t.name: sumsq[t.name] for t in known},
            rows={t.name: 0 for t in known},
            targets={t.name: TargetInfo(tuple(t.shape), t.k_axis) for t in known},
            model_fingerprint=fingerprint(known),
            gram=dict(gram or {}),
        )

    def check(self, targets: Sequence[Target], gram: bool = False) -> None:
        """Raise a one-line GraphpruneError unless these statistics cover ``targets`` with the same K.

        The one validation of statistics, however they were made (calibrated here, loaded from a file, wrapped
        from a plain mapping): every target has Σx² of shape [K] collected for a weight of its shape, and with
        ``gram`` a finite [K, K] Gram matrix.
        """
        _refuse_missing(
            [t.name for t in targets if t.name not in self.sumsq],
            "the statistics do not match this model: no statistics for {count} weight(s) ({names}); "
            "calibrate this model again",
        )
        for t in targets:
            info = self.targets.get(t.name)
            if info is None or info.k != t.k or info.shape != tuple(t.shape):
                collected = "an unknown shape" if info is None else f"shape {info.shape} (K={info.k})"
                raise GraphpruneError(
                    f"the statistics do not match this model: weight {t.name} has shape {tuple(t.shape)} "
                    f"(K={t.k}), the statistics were collected for {collected}"
                )
            if np.shape(self.sumsq[t.name]) != (t.k,):
                raise GraphpruneError(
                    f"the statistics are corrupt: weight {t.name} has {np.shape(self.sumsq[t.name])} input "
                    f"statistics, expected ({t.k},)"
                )
            refuse_non_finite({t.name: self.sumsq[t.name]})
        if not gram:
            return
        _refuse_missing(
            [t.name for t in targets if t.name not in self.gram],
            "sparsegpt and alps need Gram matrices, and the statistics hold none for {count} weight(s) "
            "({names}): collect statistics with `gram=True`, or pass calibration data (`calib`)",
        )
        for t in targets:
            g = self.gram[t.name]
            if np.shape(g) != (t.k, t.k):
                raise GraphpruneError(
                    f"the statistics are corrupt: the Gram matrix of {t.name} is {np.shape(g)}, expected "
                    f"({t.k}, {t.k})"
                )
            if not np.isfinite(g).all():
                raise GraphpruneError(
                    f"the Gram matrix of {t.name} holds NaN or Inf (the activations overflowed or were NaN): "
                    "check the model and the calibration data"
                )

    def save(self, path: str | Path) -> Path:
        """Write the statistics to ``path`` (``.npz`` is appended when missing); returns the path written."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        names = sorted(self.sumsq)
        refuse_non_finite({**self.sumsq, **self.gram}, nothing_written=True)  # a file no prune could use
        arrays: dict[str, np.ndarray] = {}
        gram_index: dict[int, int] = {}
        gram_of: dict[str, int] = {}
        for i, name in enumerate(names):
            arrays[f"sumsq_{i}"] = np.asarray(self.sumsq[name], dtype=np.float64)
            if name in self.gram:
                g = self.gram[name]
                if id(g) not in gram_index:
                    gram_index[id(g)] = len(gram_index)
                    arrays[f"gram_{gram_index[id(g)]}"] = np.asarray(g, dtype=np.float64)
                gram_of[name] = gram_index[id(g)]
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "model_fingerprint": self.model_fingerprint,
            "names": names,
            "rows": [int(self.rows[n]) for n in names],
            "shapes": [list(self.targets[n].shape) for n in names],
            "k_axes": [self.targets[n].k_axis for n in names],
            "gram_of": gram_of,
            "warnings": self.warnings,
        }
        arrays["meta"] = np.array(json.dumps(meta))
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **arrays)  # type: ignore[arg-type]  # numpy: a ** mapping might fill allow_pickle
        return path

    @classmethod
    def load(cls, path: str | Path, targets: Sequence[Target] | None = None) -> ActivationStats:
        """Read statistics written by :meth:`save`; with ``targets``, check that they match that model."""
        path = Path(path)
        try:
            with open_npz(path, "statistics") as f:
                if "meta" not in f.files:
                    raise GraphpruneError(f"{path} is not a graphprune statistics file (it has no metadata)")
                meta = json.loads(str(f["meta"][()]))
                check_meta(meta, path, FORMAT, VERSION)
                names: list[str] = meta["names"]
                sumsq = {n: f[f"sumsq_{i}"] for i, n in enumerate(names)}
                grams = {j: f[f"gram_{j}"] for j in set(meta.get("gram_of", {}).values())}
        except FileNotFoundError:
            raise GraphpruneError(f"statistics file not found: {path}") from None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if "pickle" in reason:  # what numpy says of a file that is not an .npz at all
                reason = "not an .npz archive"
            raise GraphpruneError(f"cannot read statistics from {path}: {reason}") from None
        entries = [(n, list(s), k) for n, s, k in zip(names, meta["shapes"], meta["k_axes"], strict=True)]
        check_arrays(meta, sumsq, grams, _digest(entries), path)
        stats = cls(
            sumsq=sumsq,
            rows=dict(zip(names, meta["rows"], strict=True)),
            targets={
                n: TargetInfo(tuple(s), k) for n, s, k in zip(names, meta["shapes"], meta["k_axes"], strict=True)
            },
            model_fingerprint=meta["model_fingerprint"],
            gram={n: grams[j] for n, j in meta["gram_of"].items()},
            warnings=list(meta.get("warnings", [])),
        )
        if targets is not None:
            stats.check(targets)
        return stats


def _refuse_missing(names: list[str], message: str) -> None:
    if names:
        raise GraphpruneError(message.format(count=len(names), names=a_few(names)))
