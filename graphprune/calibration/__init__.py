"""Activation statistics for Wanda (and SparseGPT), computed inside the graph by ONNX Runtime, streamed."""

from graphprune.calibration.data import ArraySource, IterableSource, NpzDirSource, NpzSource, Source, open_source
from graphprune.calibration.request import CalibrationRequest
from graphprune.calibration.run import Progress, calibrate
from graphprune.calibration.stats import ActivationStats, fingerprint

__all__ = [
    "ActivationStats",
    "ArraySource",
    "CalibrationRequest",
    "IterableSource",
    "NpzDirSource",
    "NpzSource",
    "Progress",
    "Source",
    "calibrate",
    "fingerprint",
    "open_source",
]
