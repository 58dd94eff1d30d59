"""Activation statistics for Wanda (and SparseGPT), computed inside the graph by ONNX Runtime, streamed."""

from graphprune.calibration.data import ArraySource, IterableSource, NpzDirSource, NpzSource, Source, open_source
from graphprune.calibration.run import calibrate
from graphprune.calibration.stats import ActivationStats, fingerprint

__all__ = [
    "ActivationStats",
    "ArraySource",
    "IterableSource",
    "NpzDirSource",
    "NpzSource",
    "Source",
    "calibrate",
    "fingerprint",
    "open_source",
]
