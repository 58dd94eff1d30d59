"""graphprune: prune ONNX models for sparse tensor cores.

The public API, all importable from here::

    model = load_model("model.onnx")                 # an onnx_ir.Model, external weights read lazily
    result = PrunePass(PruneConfig(NMPattern(2, 4)))(model)
    save_model(model, "model.pruned.onnx")

Passes are ``onnx_ir`` passes: compose them with ``onnx_ir.passes.Sequential``.
"""

from graphprune.algorithms.pattern import NMPattern, Scope, Unstructured
from graphprune.algorithms.scores import Method
from graphprune.calibration import ActivationStats, calibrate
from graphprune.calibration.request import CalibrationRequest
from graphprune.errors import GraphpruneError
from graphprune.graph.model_io import load_model, save_model
from graphprune.graph.targets import Consumer, Skip, Target, TargetScan, find_targets
from graphprune.passes.check import CheckPass, CheckResult
from graphprune.passes.prune import PruneConfig, PrunePass, PruneResult
from graphprune.pipeline.files import check_file, prune_file

__version__ = "0.1.0"

__all__ = [
    "ActivationStats",
    "CalibrationRequest",
    "CheckPass",
    "CheckResult",
    "Consumer",
    "GraphpruneError",
    "Method",
    "NMPattern",
    "PruneConfig",
    "PrunePass",
    "PruneResult",
    "Scope",
    "Skip",
    "Target",
    "TargetScan",
    "Unstructured",
    "calibrate",
    "check_file",
    "find_targets",
    "load_model",
    "prune_file",
    "save_model",
]
