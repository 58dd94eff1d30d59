"""graphprune: prune ONNX models for sparse tensor cores.

The public API, all importable from here (``dir(graphprune)`` lists it)::

    model = load_model("model.onnx")                 # an onnx_ir.Model, external weights read lazily
    result = PrunePass(config=PruneConfig(NMPattern(2, 4)))(model)
    save_model(model, "model.pruned.onnx")

One library function per command, each checking every file it writes before the work and writing all or none:
``prune_file`` (apply), ``check_file`` (check), ``evaluate_files`` (eval), ``calibrate_file`` (calibrate),
``shrink_file`` (shrink),
``convert_file`` (convert), ``build_engine`` (build).

Passes are ``onnx_ir`` passes: compose them with ``graphprune.passes.base.Sequential`` (onnx-ir's
``Sequential``, whose graphprune errors reach the caller unwrapped).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from graphprune.algorithms.pattern import NMPattern, Scope, Unstructured
    from graphprune.algorithms.scores import Method
    from graphprune.algorithms.structured import StructuredMethod
    from graphprune.calibration import ActivationStats, calibrate
    from graphprune.calibration.request import CalibrationRequest
    from graphprune.errors import GraphpruneError
    from graphprune.evaluate.files import Evaluation, evaluate_files
    from graphprune.graph.model_io import load_model, save_model
    from graphprune.graph.targets import Consumer, Skip, Target, TargetScan, find_targets
    from graphprune.passes.base import Statistics
    from graphprune.passes.check import CheckPass, CheckResult
    from graphprune.passes.prune import PruneConfig, PrunePass, PruneResult, WeightReport
    from graphprune.passes.shrink import ShrinkPass
    from graphprune.pipeline.calibrate_file import calibrate_file
    from graphprune.pipeline.convert_file import ConvertFileResult, convert_file
    from graphprune.pipeline.files import check_file, prune_file
    from graphprune.pipeline.shrink import ShrinkConfig, ShrinkReport, shrink_file, shrink_model
    from graphprune.tensorrt.build import build_engine
    from graphprune.tensorrt.report import BuildReport

# Where each public name lives: imported on first use, so ``import graphprune`` (and the command line's start)
# does not pay for onnx-ir, ONNX Runtime and calibration until they are needed.
_HOME = {
    "NMPattern": "graphprune.algorithms.pattern",
    "Scope": "graphprune.algorithms.pattern",
    "Unstructured": "graphprune.algorithms.pattern",
    "Method": "graphprune.algorithms.scores",
    "ActivationStats": "graphprune.calibration",
    "calibrate": "graphprune.calibration",
    "CalibrationRequest": "graphprune.calibration.request",
    "GraphpruneError": "graphprune.errors",
    "load_model": "graphprune.graph.model_io",
    "save_model": "graphprune.graph.model_io",
    "Consumer": "graphprune.graph.targets",
    "Skip": "graphprune.graph.targets",
    "Target": "graphprune.graph.targets",
    "TargetScan": "graphprune.graph.targets",
    "find_targets": "graphprune.graph.targets",
    "CheckPass": "graphprune.passes.check",
    "CheckResult": "graphprune.passes.check",
    "PruneConfig": "graphprune.passes.prune",
    "PrunePass": "graphprune.passes.prune",
    "PruneResult": "graphprune.passes.prune",
    "Statistics": "graphprune.passes.base",
    "WeightReport": "graphprune.passes.prune",
    "ShrinkPass": "graphprune.passes.shrink",
    "calibrate_file": "graphprune.pipeline.calibrate_file",
    "ConvertFileResult": "graphprune.pipeline.convert_file",
    "convert_file": "graphprune.pipeline.convert_file",
    "Evaluation": "graphprune.evaluate.files",
    "evaluate_files": "graphprune.evaluate.files",
    "BuildReport": "graphprune.tensorrt.report",
    "build_engine": "graphprune.tensorrt.build",
    "check_file": "graphprune.pipeline.files",
    "prune_file": "graphprune.pipeline.files",
    "StructuredMethod": "graphprune.algorithms.structured",
    "ShrinkConfig": "graphprune.pipeline.shrink",
    "ShrinkReport": "graphprune.pipeline.shrink",
    "shrink_file": "graphprune.pipeline.shrink",
    "shrink_model": "graphprune.pipeline.shrink",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'graphprune' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public API (loaded lazily, so the module's own namespace does not list it yet)."""
    return sorted({*globals(), *_HOME})


__version__ = "0.1.0"

__all__ = [
    "ActivationStats",
    "BuildReport",
    "CalibrationRequest",
    "CheckPass",
    "CheckResult",
    "Consumer",
    "ConvertFileResult",
    "Evaluation",
    "GraphpruneError",
    "Method",
    "NMPattern",
    "PruneConfig",
    "PrunePass",
    "PruneResult",
    "Scope",
    "ShrinkConfig",
    "ShrinkPass",
    "ShrinkReport",
    "Skip",
    "Statistics",
    "StructuredMethod",
    "Target",
    "TargetScan",
    "Unstructured",
    "WeightReport",
    "build_engine",
    "calibrate",
    "calibrate_file",
    "check_file",
    "convert_file",
    "evaluate_files",
    "find_targets",
    "load_model",
    "prune_file",
    "save_model",
    "shrink_file",
    "shrink_model",
]
