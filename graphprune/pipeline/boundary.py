"""The tensors that cross segment boundaries, one array per calibration batch, spilled to disk above a budget.

Segment-wise calibration keeps no activation but these (the residual stream, masks, rotary tables, the graph
inputs). They stay in memory while the bytes held stay within ``budget``; a tensor that would go over it is
written to a temporary directory with ``np.save`` instead and read back when a segment feeds it. The budget is
respected by construction: :attr:`BoundaryTensors.held_bytes` never exceeds it. The directory is removed by
:meth:`BoundaryTensors.close` (the engine calls it however the run ends).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class _Entry:
    """One batch's value of one tensor: in memory, or a file in the spill directory."""

    array: np.ndarray | None
    path: Path | None
    nbytes: int


@dataclass
class BoundaryTensors:
    """Name -> per-batch arrays, held in memory within ``budget`` bytes (None: no limit) and on disk beyond."""

    budget: int | None = None
    held_bytes: int = 0  # in memory now
    peak_held_bytes: int = 0
    spilled_bytes: int = 0  # written to disk so far
    spilled: set[str] = field(default_factory=set)  # names with at least one batch on disk
    _entries: dict[str, list[_Entry]] = field(default_factory=dict)
    _specs: dict[str, tuple[np.dtype, int]] = field(default_factory=dict)
    _dir: Path | None = None
    _files: int = 0

    def append(self, name: str, value: np.ndarray) -> None:
        """Add the next batch's value of ``name``."""
        entries = self._entries.setdefault(name, [])
        self._specs.setdefault(name, (value.dtype, value.ndim))
        if self.budget is None or self.held_bytes + value.nbytes <= self.budget:
            entries.append(_Entry(value, None, value.nbytes))
            self.held_bytes += value.nbytes
            self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes)
            return
        path = self._spill_dir() / f"{self._files}.npy"
        self._files += 1
        np.save(path, value, allow_pickle=False)
        entries.append(_Entry(None, path, value.nbytes))
        self.spilled_bytes += value.nbytes
        self.spilled.add(name)

    def get(self, name: str, batch: int) -> np.ndarray:
        entry = self._entries[name][batch]
        if entry.array is not None:
            return entry.array
        assert entry.path is not None
        return np.load(entry.path, allow_pickle=False)

    def spec(self, name: str) -> tuple[np.dtype, int]:
        """Element type and rank of ``name`` (the same in every batch)."""
        return self._specs[name]

    def names(self) -> list[str]:
        return list(self._entries)

    def drop(self, name: str) -> None:
        """Forget ``name``: its memory is released and its files deleted."""
        for entry in self._entries.pop(name, []):
            if entry.array is not None:
                self.held_bytes -= entry.nbytes
            elif entry.path is not None:
                entry.path.unlink(missing_ok=True)
        self._specs.pop(name, None)

    def close(self) -> None:
        """Forget everything and remove the spill directory."""
        for name in self.names():
            self.drop(name)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def _spill_dir(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="graphprune-spill-"))
        return self._dir


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_memory_size(text: str) -> int:
    """Bytes in a size such as ``8GB``, ``8 GiB``, ``512MB`` or ``1.5g`` (KB/MB/GB/TB: powers of 1000)."""
    from graphprune.errors import GraphpruneError

    stripped = text.strip().lower().replace(" ", "").replace("_", "")
    number = stripped.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = stripped[len(number) :]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or not value > 0 or value == float("inf"):
        raise GraphpruneError(f"`max_memory` {text!r}: give a positive size with a unit, e.g. 8GB, 512MB or 16GiB")
    return int(value * _UNITS[unit])


def format_size(n: int) -> str:
    """Bytes as a short size in powers of 1000, as ``--max-memory`` reads them: 8.0 GB, 512 MB, 4 kB."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"
