"""Which TensorRT builds the engine: full TensorRT (``tensorrt``) or TensorRT for RTX (``tensorrt_rtx_bindings``).

This module and the others in ``graphprune/tensorrt/`` are the only ones that touch a TensorRT, and only through
:func:`load_backend`, which imports it lazily. Both products expose the same Python API (Builder, OnnxParser,
BuilderConfig, ``BuilderFlag.SPARSE_WEIGHTS``, optimisation profiles), so one build path serves both; they differ
in what the build needs and how precision is chosen:

* TensorRT 10/11 builds on the GPU it targets (it times kernels there). TensorRT 10 still takes precision builder
  flags for an FP32 network; TensorRT 11 is always strongly typed.
* TensorRT-RTX builds ahead of time without a GPU and finishes kernel selection when the engine is loaded on the
  user's GPU. It is strongly typed only (no FP16/BF16/INT8 builder flags): precision comes from the ONNX file.

PyPI's standalone TensorRT-RTX wheels (``tensorrt-rtx-cu12-bindings`` + ``tensorrt-rtx-cu12-libs``) install the
module ``tensorrt_rtx_bindings``; the ``tensorrt_rtx`` name on PyPI is a meta-package that pulls a CUDA-13 wheel,
so that is the module imported here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from graphprune.errors import GraphpruneError


@dataclass(frozen=True, kw_only=True)
class Backend:
    """One TensorRT product as graphprune uses it."""

    name: str  # the --backend value
    product: str  # how its vendor names it
    module: str  # the Python module to import
    install: str  # the command that installs it
    builds_without_gpu: bool  # ahead-of-time build: no GPU, no CUDA driver needed
    always_strongly_typed: bool  # precision comes from the ONNX file, no precision builder flags
    timing_cache: bool  # has a timing cache (TensorRT-RTX's are no-ops, deprecated since 1.2)


BACKENDS = {
    "tensorrt": Backend(
        name="tensorrt",
        product="TensorRT",
        module="tensorrt",
        install="pip install tensorrt  (10.x or 11.x, on a machine with an NVIDIA GPU)",
        builds_without_gpu=False,
        always_strongly_typed=False,  # TensorRT 10: weakly typed networks with flags; 11: see plan_build
        timing_cache=True,
    ),
    "tensorrt-rtx": Backend(
        name="tensorrt-rtx",
        product="TensorRT-RTX",
        module="tensorrt_rtx_bindings",
        install='pip install "graphprune[trt-rtx]"',
        builds_without_gpu=True,
        always_strongly_typed=True,
        timing_cache=False,
    ),
}
DEFAULT_ORDER = ("tensorrt", "tensorrt-rtx")  # the full product first when both are installed


@dataclass(frozen=True)
class LoadedBackend:
    """A backend and its imported module."""

    backend: Backend
    trt: Any  # the module: tensorrt or tensorrt_rtx_bindings
    version: str

    @property
    def label(self) -> str:
        return f"{self.backend.product} {self.version}"


def load_backend(name: str | None = None) -> LoadedBackend:
    """Import the backend called ``name``, or the first installed one of :data:`DEFAULT_ORDER`.

    One-line errors when it is unknown, missing, or installed without loadable libraries.
    """
    if name is not None and name not in BACKENDS:
        raise GraphpruneError(f"unknown `backend` {name!r}: choose one of {', '.join(BACKENDS)}")
    candidates = [BACKENDS[name]] if name else [BACKENDS[n] for n in DEFAULT_ORDER]
    reasons = []
    for backend in candidates:
        try:
            module = importlib.import_module(backend.module)  # lazy on purpose: graphprune runs without it
        except ImportError as exc:
            reasons.append(f"{backend.product}: {backend.install}")
            if name:
                raise GraphpruneError(
                    f"{backend.product} is not installed ({exc.name or exc}): {backend.install}"
                ) from None
            continue
        except OSError as exc:  # the Python package is there, its shared libraries are not loadable
            raise GraphpruneError(f"{backend.product} is installed but cannot load its libraries: {exc}") from None
        return LoadedBackend(backend, module, str(getattr(module, "__version__", "unknown")))
    raise GraphpruneError(
        "no TensorRT is installed: " + "; ".join(reasons) + ". Checking a model and timing it with PyTorch "
        "(`backend=torch`) work without it"
    )
