"""The exact graph rewrites a ``target`` ``ort`` model gets besides quantization: ONNX Runtime's CPU optimiser
misses these exporter patterns (measured in BENCHMARKS.md); TensorRT's own fusions are left their input as is."""

from __future__ import annotations

import onnx_ir as ir

from graphprune.quantize.gelu import reorder_erf_gelus
from graphprune.quantize.guards import move_nan_guards


def rewrite_for_ort(model: ir.Model) -> dict[str, list[str]]:
    """Apply every rewrite in place; per rewrite, the guards or GELU outputs it changed."""
    return {"nan_guards_moved": move_nan_guards(model), "gelus_reordered": reorder_erf_gelus(model)}
