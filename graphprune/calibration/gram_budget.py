"""Keep one-shot SparseGPT's Gram matrices within a memory budget: calibrate in chunks, spill them to disk.

A Gram matrix XᵀX is K x K float64 per distinct activation (the weights that read one tensor share it). For a
large model they do not all fit at once: the targets are split into chunks whose Grams fit the budget, each chunk
is calibrated in its own pass over the data, and its Grams go to a temporary directory, read back (memory-mapped)
one at a time when the weight is pruned. ``--sequential`` needs none of this: it holds one block's Grams at a time.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from graphprune.calibration.stats import ActivationStats
from graphprune.graph.targets import Target

GIB = 1 << 30


def gram_bytes(targets: Sequence[Target]) -> int:
    """Bytes of the float64 Gram matrices these targets need (one per distinct activation and K)."""
    distinct = {(c.activation, t.k) for t in targets for c in t.consumers}
    return sum(k * k * 8 for _, k in distinct)


def chunks_within(targets: Sequence[Target], budget: int) -> list[list[Target]]:
    """Consecutive chunks of targets whose Grams fit ``budget`` bytes (a single larger target is its own chunk)."""
    chunks: list[list[Target]] = [[]]
    for target in targets:
        if chunks[-1] and gram_bytes([*chunks[-1], target]) > budget:
            chunks.append([])
        chunks[-1].append(target)
    return [c for c in chunks if c]


class SpilledGrams(Mapping[str, np.ndarray]):
    """Gram matrices in ``.npy`` files of a temporary directory, memory-mapped on access."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="graphprune-gram-")
        self._files: dict[str, Path] = {}

    def add(self, grams: Mapping[str, np.ndarray]) -> None:
        written: dict[int, Path] = {}  # weights that share an activation share one file
        for name, gram in grams.items():
            if id(gram) not in written:
                written[id(gram)] = Path(self._dir.name) / f"{len(self._files)}.npy"
                np.save(written[id(gram)], gram)
            self._files[name] = written[id(gram)]

    def __getitem__(self, name: str) -> np.ndarray:
        return np.load(self._files[name], mmap_mode="r")

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def calibrate_within(
    targets: Sequence[Target],
    budget: int,
    calibrate_chunk: Callable[[list[Target]], ActivationStats],
) -> ActivationStats:
    """One-shot statistics with Grams for ``targets``, at most ``budget`` bytes of Grams in memory at a time."""
    chunks = chunks_within(targets, budget)
    if len(chunks) == 1:
        return calibrate_chunk(chunks[0])
    spilled = SpilledGrams()
    merged: ActivationStats | None = None
    for chunk in chunks:
        stats = calibrate_chunk(chunk)
        spilled.add(stats.gram)
        stats.gram = {}
        if merged is None:
            merged = stats
        else:
            merged.sumsq.update(stats.sumsq)
            merged.rows.update(stats.rows)
            merged.targets.update(stats.targets)
            merged.warnings.extend(stats.warnings)
    assert merged is not None
    merged.gram = spilled  # type: ignore[assignment]  # spilled Grams: a read-only mapping read like the dict
    return merged
