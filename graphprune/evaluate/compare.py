"""Compare a dense and a pruned model's outputs on the same inputs, streaming batch by batch."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from graphprune.errors import GraphpruneError, a_few


@dataclass(kw_only=True)
class OutputComparison:
    """Running agreement of one output between the dense and the pruned model."""

    name: str
    samples: int = 0
    cosine_sum: float = 0.0  # Σ over samples of the cosine of the flattened sample
    diff_sq: float = 0.0  # Σ (dense - pruned)²
    dense_sq: float = 0.0  # Σ dense²
    top1_same: int = 0  # positions whose argmax over the last axis agree
    top1_total: int = 0

    def add(self, dense: np.ndarray, pruned: np.ndarray) -> None:
        a = dense.astype(np.float64).reshape(dense.shape[0], -1)
        b = pruned.astype(np.float64).reshape(pruned.shape[0], -1)
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        dots = (a * b).sum(axis=1)
        # Two all-zero samples agree perfectly; one zero against a non-zero does not at all.
        both_zero = (np.abs(a).sum(axis=1) == 0) & (np.abs(b).sum(axis=1) == 0)
        cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), both_zero * 1.0)
        self.cosine_sum += float(cos.sum())
        self.samples += a.shape[0]
        self.diff_sq += float(((a - b) ** 2).sum())
        self.dense_sq += float((a**2).sum())
        if dense.ndim >= 2 and dense.shape[-1] > 1:
            self.top1_same += int((dense.argmax(axis=-1) == pruned.argmax(axis=-1)).sum())
            self.top1_total += int(np.prod(dense.shape[:-1]))

    @property
    def cosine(self) -> float:
        return self.cosine_sum / self.samples if self.samples else float("nan")

    @property
    def relative_l2(self) -> float:
        return float(np.sqrt(self.diff_sq / self.dense_sq)) if self.dense_sq else float("nan")

    @property
    def top1_agreement(self) -> float | None:
        return self.top1_same / self.top1_total if self.top1_total else None

    def to_dict(self) -> dict[str, object]:
        return {
            "output": self.name,
            "samples": self.samples,
            "cosine": self.cosine,
            "relative_l2": self.relative_l2,
            "top1_agreement": self.top1_agreement,
        }


def compare_outputs(
    run_dense: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    run_pruned: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    batches: Iterable[dict[str, np.ndarray]],
    on_batch: Callable[[int], None] | None = None,
) -> list[OutputComparison]:
    """Feed every batch to both models; per float output, accumulate cosine, relative L2 and top-1 agreement."""
    results: dict[str, OutputComparison] = {}
    for batch in batches:
        dense, pruned = run_dense(batch), run_pruned(batch)
        for name, value in dense.items():
            if not np.issubdtype(value.dtype, np.floating) or value.ndim == 0:
                continue
            if name not in pruned or np.shape(pruned[name]) != value.shape:
                got = np.shape(pruned[name]) if name in pruned else "nothing"
                raise GraphpruneError(f"output {name}: the dense model gives {value.shape}, the pruned {got}")
            results.setdefault(name, OutputComparison(name=name)).add(value, pruned[name])
        if on_batch:
            on_batch(next(iter(batch.values())).shape[0])
    return list(results.values())


def check_comparable(dense: Any, pruned: Any) -> None:
    """Raise a one-line GraphpruneError unless two ONNX Runtime sessions take the same inputs (names, types,
    ranks) and give the same outputs (names, types, ranks): only then can their outputs be compared."""
    for kind in ("inputs", "outputs"):
        a = {arg.name: arg for arg in getattr(dense, f"get_{kind}")()}
        b = {arg.name: arg for arg in getattr(pruned, f"get_{kind}")()}
        only_dense, only_pruned = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        if only_dense or only_pruned:
            what = "; ".join(
                f"only the {which} model has {a_few(names)}"
                for which, names in (("dense", only_dense), ("pruned", only_pruned))
                if names
            )
            raise GraphpruneError(f"the two models have different {kind}: {what}")
        for name, arg in a.items():
            other = b[name]
            if arg.type != other.type:
                raise GraphpruneError(
                    f"{kind[:-1]} {name} is {arg.type} in the dense model, {other.type} in the pruned"
                )
            if arg.shape is not None and other.shape is not None and len(arg.shape) != len(other.shape):
                ranks = f"rank {len(arg.shape)} in the dense model, {len(other.shape)} in the pruned"
                raise GraphpruneError(f"{kind[:-1]} {name} has {ranks}")
