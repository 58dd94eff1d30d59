"""The graph rewrites a ``target`` ``ort`` model gets besides quantization: ONNX Runtime's CPU optimiser misses
these exporter patterns (measured in BENCHMARKS.md); TensorRT's own fusions are left their input as is.

Moving the NaN guards, reordering the GELUs and writing the residual Adds before LayerNormalization as Sum (which
keeps ONNX Runtime from swapping in its slow SkipLayerNormalization CPU kernel) are exact. Fusing attention into
ONNX Runtime's MultiHeadAttention (:mod:`graphprune.quantize.fuse_attention`) is not bit-exact (the fused kernel
sums in its own order), so it is asked for separately, and runs on the quantized model, before the guards it
does not fuse are moved.
"""

from __future__ import annotations

import onnx_ir as ir

from graphprune.quantize.fuse_attention import fuse_attention
from graphprune.quantize.gelu import reorder_erf_gelus
from graphprune.quantize.guards import move_nan_guards
from graphprune.quantize.layer_norm_sums import sum_before_layer_norms


def rewrite_for_ort(model: ir.Model, attention: bool = False) -> dict[str, list[str]]:
    """Apply the exact rewrites in place, before calibration; per rewrite, what it changed. With ``attention``
    the NaN guards stay where the exporter put them, for :func:`fuse_for_ort` to fuse with their cores."""
    done: dict[str, list[str]] = {}
    if not attention:
        done["nan_guards_moved"] = move_nan_guards(model)
    done["gelus_reordered"] = reorder_erf_gelus(model)
    done["layer_norm_sums"] = sum_before_layer_norms(model)
    return done


def fuse_for_ort(model: ir.Model) -> dict[str, list[str]]:
    """Fuse the attention cores of a quantized model in place, then move the guards of the cores left unfused
    (``attention_not_fused``: each with the reason). Run after quantization: calibration, GPTQ and its
    block-by-block segments then read the attention as exported, with no control flow."""
    fused, refused = fuse_attention(model)
    return {"attention_fused": fused, "attention_not_fused": refused, "nan_guards_moved": move_nan_guards(model)}
