"""The graph rewrites a ``target`` ``ort`` model gets besides quantization: ONNX Runtime's CPU optimiser misses
these exporter patterns (measured in BENCHMARKS.md); TensorRT's own fusions are left their input as is.

Moving the NaN guards, reordering the GELUs and writing the residual Adds before LayerNormalization as Sum (which
keeps ONNX Runtime from swapping in its slow SkipLayerNormalization CPU kernel) are exact. Fusing attention into
ONNX Runtime's MultiHeadAttention (:mod:`graphprune.quantize.fuse_attention`) is not bit-exact (the fused kernel
sums in its own order), so it is asked for separately and runs first: the guards it fuses are then no longer
there to move.
"""

from __future__ import annotations

import onnx_ir as ir

from graphprune.quantize.fuse_attention import fuse_attention
from graphprune.quantize.gelu import reorder_erf_gelus
from graphprune.quantize.guards import move_nan_guards
from graphprune.quantize.layer_norm_sums import sum_before_layer_norms


def rewrite_for_ort(model: ir.Model, attention: bool = False) -> dict[str, list[str]]:
    """Apply every rewrite in place (``attention``: also fuse attention cores); per rewrite, what it changed
    (``attention_not_fused``: each Softmax feeding a MatMul that was left as it is, with the reason)."""
    done: dict[str, list[str]] = {}
    if attention:
        done["attention_fused"], done["attention_not_fused"] = fuse_attention(model)
    done["nan_guards_moved"] = move_nan_guards(model)
    done["gelus_reordered"] = reorder_erf_gelus(model)
    done["layer_norm_sums"] = sum_before_layer_norms(model)
    return done
