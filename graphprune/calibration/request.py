"""What a prune asks of calibration: the data and how to read and run it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from graphprune.calibration.data import open_source
from graphprune.calibration.signature import model_inputs, validate_feed
from graphprune.errors import GraphpruneError


@dataclass(frozen=True)
class CalibrationRequest:
    """Calibration data (a path, arrays, an iterable of feeds or None for synthetic inputs) and its options."""

    data: Any = None
    tokenizer: str | None = None
    seqlen: int = 512
    nsamples: int = 128
    seed: int = 0
    batch_size: int = 8
    shapes: Mapping[str, Sequence[int]] = field(default_factory=dict)
    provider: str = "cpu"
    gram_memory_gb: float = 4.0  # one-shot SparseGPT: Gram matrices held at once; more are spilled to disk

    def options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`graphprune.calibration.calibrate` and :func:`open_source`."""
        return {
            "batch_size": self.batch_size,
            "tokenizer": self.tokenizer,
            "seqlen": self.seqlen,
            "nsamples": self.nsamples,
            "seed": self.seed,
            "shapes": dict(self.shapes),
        }

    def batches(self, model: onnx.ModelProto) -> tuple[list[dict[str, np.ndarray]], list[str]]:
        """Every feed, validated against the model and kept in memory (sequential pruning reads them per group)."""
        specs = model_inputs(model)
        source = open_source(self.data, model, specs, **self.options())
        batches = [validate_feed(feed, specs, label) for label, feed in source]
        if not batches:
            raise GraphpruneError("the calibration data is empty")
        return [dict(b) for b in batches], list(source.warnings)
