"""What ``graphprune quantize`` is asked to do: one frozen options object, validated before any model is read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from graphprune.algorithms.clip_search import CLIP_MODES, ClipMode
from graphprune.errors import GraphpruneError

Precision = Literal["int8", "fp8", "int4"]
Target = Literal["tensorrt", "ort"]
Method = Literal["rtn", "gptq"]
Clip = Literal["minmax", "mse", "percentile"]
BLOCK_SIZES = (32, 64, 128)
# Lowest default-domain opset whose QuantizeLinear/DequantizeLinear read the precision (fp8: 19; blocked int4: 21).
MIN_OPSET = {"int8": 13, "fp8": 19, "int4": 21}


@dataclass(frozen=True, kw_only=True)
class QuantizeConfig:
    """Precision, grid and calibration choices of one quantization run.

    ``target`` decides the activations' int8 grid: ``tensorrt`` is symmetric int8 with zero point 0 (the only form
    TensorRT reads), ``ort`` is asymmetric uint8 (ONNX Runtime's x86 U8S8 kernels). Weights are always symmetric,
    so a pruned zero stays exactly zero. ``dynamic`` computes activation scales at run time instead.
    ``smooth`` is SmoothQuant's migration strength alpha (None: no smoothing). ``clip`` chooses each static
    activation scale's range: the calibrated min/max, or a clip of it chosen in the graph by least squared
    quantization error (``mse``) or at the ``percentile`` of |x| (:mod:`graphprune.quantize.clip`). ``bmm``
    also quantizes the MatMuls of two activations (attention's Q·Kᵀ and probabilities·V), both operands per
    tensor, with static scales only (int8, fp8). ``target`` ``ort`` also moves the exporter's softmax NaN guards
    past the probabilities·V MatMul (:mod:`graphprune.quantize.guards`), a rewrite that only ONNX Runtime needs,
    and with ``fuse_attention`` (and no ``bmm``) fuses each attention core into ONNX Runtime's MultiHeadAttention
    (:mod:`graphprune.quantize.fuse_attention`; not bit-exact).
    ``weight_clip``: each weight scale is the best clip of its group's absmax (``mse``: weight error;
    ``hessian``: error weighted by the Gram matrix, so it needs calibration). GPTQ's ``act_order`` (columns by
    descending Gram diagonal, scales fixed up front from the original weights), ``percdamp`` and ``sequential``
    (each block's Grams measured on the model whose earlier blocks are already quantized) apply to
    ``method="gptq"`` only. ``awq`` (int4): activation-aware weight scales, searched per activation on the Gram
    matrices and folded exactly into the model before the weights are rounded (:mod:`graphprune.quantize.awq`).
    ``refit_scales``: once the codes are fixed, each row's scales are re-solved by least squares on the Gram
    matrix (:mod:`graphprune.algorithms.scale_refit`).
    """

    precision: Precision = "int8"
    method: Method = "rtn"
    target: Target = "tensorrt"
    dynamic: bool = False
    block_size: int = 128  # int4: weights per scale along K
    smooth: float | None = None
    include_head: bool = False
    exclude: tuple[str, ...] = ()
    float_above: float | None = None  # activations reaching |x| above this (after smoothing) stay float
    clip: Clip = "minmax"
    percentile: float = 99.99  # clip "percentile": the share of |x| (in %) the range must hold
    bmm: bool = False  # off: measured no faster on ONNX Runtime's CPU, and a quality cost (BENCHMARKS.md)
    weight_clip: ClipMode = "none"
    act_order: bool = False
    percdamp: float = 0.01
    sequential: bool = False
    fuse_attention: bool = True  # target ort without bmm: attention cores → MultiHeadAttention (BENCHMARKS.md)
    awq: bool = False
    refit_scales: bool = False

    def validate(self) -> None:
        if self.precision not in MIN_OPSET:
            raise GraphpruneError(f"unknown precision {self.precision!r}: choose int8, fp8 or int4")
        if self.method not in ("rtn", "gptq"):
            raise GraphpruneError(f"unknown method {self.method!r}: choose rtn or gptq")
        if self.target not in ("tensorrt", "ort"):
            raise GraphpruneError(f"unknown target {self.target!r}: choose tensorrt or ort")
        if self.precision == "int4" and self.block_size not in BLOCK_SIZES:
            raise GraphpruneError(f"block size {self.block_size} is not supported: choose 32, 64 or 128")
        if self.dynamic and self.precision != "int8":
            raise GraphpruneError(
                "dynamic activation scales exist for int8 only (fp8 is static, int4 weight-only)"
            )
        if self.smooth is not None and not 0.0 <= self.smooth <= 1.0:
            raise GraphpruneError(f"smoothing strength {self.smooth} must be between 0 and 1 (0.5 is usual)")
        if self.float_above is not None and not self.float_above > 0:
            raise GraphpruneError(
                f"the float threshold {self.float_above} must be a positive activation magnitude"
            )
        if self.clip not in ("minmax", "mse", "percentile"):
            raise GraphpruneError(f"unknown clip method {self.clip!r}: choose minmax, mse or percentile")
        if self.clip != "minmax" and not (self.quantizes_activations and not self.dynamic):
            raise GraphpruneError(
                "clipping chooses static activation scales: int4 is weight-only, dynamic scales are set when run"
            )
        if not 50.0 < self.percentile <= 100.0:
            raise GraphpruneError(f"percentile {self.percentile} must be above 50 and at most 100 (e.g. 99.99)")
        if self.weight_clip not in CLIP_MODES:
            raise GraphpruneError(f"unknown weight clip {self.weight_clip!r}: choose none, mse or hessian")
        if self.method != "gptq" and (self.act_order or self.sequential or self.percdamp != 0.01):
            raise GraphpruneError("`act_order`, `sequential` and `percdamp` are options of the gptq method")
        if not 0.0 < self.percdamp < 1.0:
            raise GraphpruneError(f"dampening {self.percdamp} must be a fraction between 0 and 1 (0.01 is usual)")
        if self.smooth is not None and self.precision == "int4":
            raise GraphpruneError(
                "smoothing moves range into the weights for quantized activations; int4 is weight-only"
            )

        if self.awq and self.precision != "int4":
            raise GraphpruneError(
                "activation-aware scaling searches weight-only int4 scales; int8 and fp8 quantize activations "
                "too: use `smooth`"
            )

    @property
    def quantizes_activations(self) -> bool:
        return self.precision != "int4"

    @property
    def needs_ranges(self) -> bool:
        """Calibrated activation ranges: static scales, or smoothing's per-channel maxima."""
        return (self.quantizes_activations and not self.dynamic) or self.smooth is not None

    @property
    def fuses_attention(self) -> bool:
        """Attention cores become ONNX Runtime's MultiHeadAttention: ``target`` ``ort`` only (a contrib op
        TensorRT does not read), and not with ``bmm``, which quantizes the MatMuls the fusion removes."""
        return self.fuse_attention and self.target == "ort" and not self.bmm

    @property
    def needs_grams(self) -> bool:
        """Gram matrices: GPTQ, the Gram-weighted clip search, the activation-aware scales, the scale refit."""
        return self.method == "gptq" or self.weight_clip == "hessian" or self.awq or self.refit_scales

    @property
    def opset(self) -> int:
        return MIN_OPSET[self.precision]
