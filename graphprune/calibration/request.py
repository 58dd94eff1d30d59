"""What a calibration needs: the data, how to read it and how to run it, in one options object."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from graphprune.calibration.cache_inputs import complete_feed, provided
from graphprune.calibration.data import Source, open_source
from graphprune.calibration.signature import Feed, InputSpec, model_inputs, validate_feed
from graphprune.errors import GraphpruneError


@dataclass(frozen=True)
class CalibrationRequest:
    """Calibration data (a path, arrays, an iterable of feeds or None for synthetic inputs) and its options."""

    data: Any = None
    _: KW_ONLY  # the rest by keyword
    tokenizer: str | None = None
    seqlen: int = 512
    nsamples: int = 128
    seed: int = 0
    batch_size: int = 1  # one window per run: activations of one window, not eight, in memory (BENCHMARKS.md)
    shapes: Mapping[str, Sequence[int]] = field(default_factory=dict)
    provider: str = "cpu"
    gram: bool = False  # also collect XᵀX (SparseGPT)
    optimize: bool = False  # let ONNX Runtime optimise the tapped graph
    gram_memory_gb: float = 4.0  # one-shot SparseGPT: Gram matrices held at once; more are spilled to disk
    max_memory: int | None = None  # bytes: run segment-wise (pipeline/segments.py) within this budget

    def __post_init__(self) -> None:  # every option fails here, before any model is loaded or run
        for option, value in (("`seqlen`", self.seqlen), ("`nsamples`", self.nsamples)):
            if value < 1:
                raise GraphpruneError(f"{option} must be at least 1, got {value}")
        if self.batch_size < 1:
            raise GraphpruneError(f"`batch_size` must be at least 1, got {self.batch_size}")
        if not (math.isfinite(self.gram_memory_gb) and self.gram_memory_gb > 0):
            raise GraphpruneError(f"`gram_memory_gb` must be a positive number of GiB, got {self.gram_memory_gb}")
        for name, dims in self.shapes.items():
            if any(d < 1 for d in dims):
                shown = "x".join(map(str, dims))
                raise GraphpruneError(f"`shapes` gives {name}={shown}: every dimension must be at least 1")

    def files(self) -> list[Path]:
        """The files (or directory) this request reads: no output may replace them."""
        paths = [self.data] if isinstance(self.data, str | Path) else []
        return [Path(p) for p in [*paths, self.tokenizer] if p]

    def options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`graphprune.calibration.data.open_source`."""
        return {
            "batch_size": self.batch_size,
            "tokenizer": self.tokenizer,
            "seqlen": self.seqlen,
            "nsamples": self.nsamples,
            "seed": self.seed,
            "shapes": dict(self.shapes),
        }

    def open(self, model: ir.Model | onnx.ModelProto) -> Feeds:
        """The data as a stream of validated feeds for ``model`` (caches and positions filled in)."""
        specs = input_specs(model)
        return Feeds(open_source(self.data, model, provided(specs), **self.options()), specs)  # type: ignore[arg-type]  # open_source reads the ir.Model too

    def batches(self, model: ir.Model | onnx.ModelProto) -> tuple[list[dict[str, np.ndarray]], list[str]]:
        """Every feed, validated and kept in memory (sequential pruning reads them once per group)."""
        feeds = self.open(model)
        batches = [feed for _, feed in feeds]
        if not batches:
            raise GraphpruneError("the calibration data is empty")
        return batches, list(feeds.source.warnings)


class Feeds:
    """A source's feeds, each completed with empty caches and positions and checked against the model."""

    def __init__(self, source: Source, specs: Sequence[InputSpec]) -> None:
        self.source, self.specs = source, specs

    def __iter__(self) -> Iterator[tuple[str, Feed]]:
        for label, feed in self.source:
            yield label, validate_feed(complete_feed(feed, self.specs), self.specs, label)


def input_specs(model: ir.Model | onnx.ModelProto) -> list[InputSpec]:
    """The inputs a feed must provide (graph inputs that are not initializers)."""
    if isinstance(model, onnx.ModelProto):
        return model_inputs(model)
    signature = onnx.ModelProto()  # the inputs alone, read by the one signature reader
    for value in model.graph.inputs:
        if value.name not in model.graph.initializers:
            ir.serde.serialize_value_into(signature.graph.input.add(), value)
    return model_inputs(signature)
