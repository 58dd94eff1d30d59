"""The shrink benchmarks' names for configurations: ``METHOD[+refit][+global][+gramN][+padN][+byMETHOD][+dampX]
[+minX][+maxX][+seq][+dense][+blendX][+stepsN][+roundN]`` (``flap+refit+global``).

Without ``+refit`` the consumers get only what the method itself does (flap's bias fold); without ``+global`` every
group loses the same ratio (uniform); ``+gram4`` measures the Gram matrices on every 4th row,
``+pad4`` on every 4th padded row (weighted 4); ``+byflap`` shares
the global budget by flap's scores while METHOD chooses the units inside each group; ``+damp0.1`` sets the refit's
damping, ``+min0.1``/``+max0.5`` global allocation's least and most per group; ``+error`` allocates globally on the
raw scores (not standardised); ``+seq`` shrinks group by group on the already shrunk prefix (``sequential``,
streamed block by block when the benchmark passes its calibration data); ``+dense`` refits towards the dense
model's outputs (with ``+seq``), ``+blend0.5`` the dense outputs' share of that target, ``+all`` refits the
layers that lose nothing too (``refit_scope="all"``, with ``+dense``); ``+steps2`` shrinks in two calibrated
rounds, ``+round16`` keeps every group's width a multiple of 16 channels (``round_to``).
"""

from __future__ import annotations

from graphprune.algorithms.structured import StructuredMethod
from graphprune.pipeline.shrink import ShrinkConfig


def variant(text: str, ratio: float, units: tuple[str, ...], **options: object) -> ShrinkConfig:
    """The configuration ``text`` names, removing ``ratio`` of the ``units``; ``options`` set other fields."""
    method, *flags = text.split("+")
    valued = {"gram": ("gram_stride", int), "pad": ("pad_stride", int), "by": ("allocate_by", StructuredMethod),
              "damp": ("damp", float), "min": ("ratio_min", float), "max": ("ratio_max", float),
              "blend": ("target_blend", float), "steps": ("steps", int), "round": ("round_to", int)}  # fmt: skip
    for flag in flags:
        if flag in ("refit", "global", "error", "seq", "dense", "all"):
            continue
        prefix = next((p for p in valued if flag.startswith(p) and len(flag) > len(p)), None)
        if prefix is None:
            raise ValueError(f"unknown variant flag {flag!r} in {text!r}")
        field, kind = valued[prefix]
        options[field] = kind(flag.removeprefix(prefix))
    return ShrinkConfig(
        ratio=ratio,
        units=units,
        method=StructuredMethod(method),
        refit="refit" in flags,
        allocate="global" if "global" in flags else "error" if "error" in flags else "uniform",
        sequential="seq" in flags,
        target="dense" if "dense" in flags else "pruned",
        refit_scope="all" if "all" in flags else "consumers",
        **options,  # type: ignore[arg-type]
    )
