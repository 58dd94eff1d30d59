"""Execution providers: short names (cpu, cuda, tensorrt …) to ONNX Runtime's, or a one-line reason why not."""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

from graphprune.errors import GraphpruneError

ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "gpu": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
}
GPU_HINT = (
    "GPU providers come with the onnxruntime-gpu wheel (pip install 'graphprune[gpu]'), which replaces the "
    "CPU-only onnxruntime wheel: uninstall onnxruntime first, the two cannot be installed together"
)


def import_ort() -> ModuleType:
    try:
        import onnxruntime
    except ImportError:
        raise GraphpruneError(
            "onnxruntime is not installed: pip install 'graphprune[cpu]' (or 'graphprune[gpu]' for CUDA)"
        ) from None
    return onnxruntime


def resolve_providers(provider: str) -> list[str]:
    """ONNX Runtime provider names to ask for, the requested one first and CPU as the fallback for other ops."""
    ort = import_ort()
    available = ort.get_available_providers()
    key = provider.strip()
    wanted = ALIASES.get(key.lower(), key)
    if wanted not in available:  # also accept e.g. "CUDA" or "cudaexecutionprovider"
        stem = key.lower().removesuffix("executionprovider")
        wanted = next((p for p in available if p.lower().removesuffix("executionprovider") == stem), wanted)
    if wanted not in available:
        hint = "" if wanted == "CPUExecutionProvider" else f"; {GPU_HINT}"
        raise GraphpruneError(
            f"provider {provider!r} ({wanted}) is not available in this onnxruntime "
            f"{ort.__version__} (available: {', '.join(available)}){hint}"
        )
    return [wanted] if wanted == "CPUExecutionProvider" else [wanted, "CPUExecutionProvider"]


THREADS_VARIABLE = "GRAPHPRUNE_THREADS"


def session_options(optimize: bool = False) -> Any:
    """ONNX Runtime session options for graphprune's own sessions.

    Graph optimisations are off unless asked for (fusions could skip tapped tensors). ``$GRAPHPRUNE_THREADS``
    caps ONNX Runtime's threads, for example to compare with a single-threaded reference on the same machine.
    """
    ort = import_ort()
    options = ort.SessionOptions()
    level = ort.GraphOptimizationLevel
    options.graph_optimization_level = level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
    threads = os.environ.get(THREADS_VARIABLE)
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return options
