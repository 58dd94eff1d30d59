"""The shrink benchmarks' names for configurations: ``METHOD[+refit][+global][+gramN][+byMETHOD]``
(``flap+refit+global``).

Without ``+refit`` the consumers get only what the method itself does (flap's bias fold); without ``+global`` every
group loses the same ratio (uniform); ``+gram4`` measures the Gram matrices on every 4th row; ``+byflap`` shares
the global budget by flap's scores while METHOD chooses the units inside each group.
"""

from __future__ import annotations

from graphprune.algorithms.structured import StructuredMethod
from graphprune.pipeline.shrink import ShrinkConfig


def variant(text: str, ratio: float, units: tuple[str, ...], **options: object) -> ShrinkConfig:
    """The configuration ``text`` names, removing ``ratio`` of the ``units``; ``options`` set other fields."""
    method, *flags = text.split("+")
    strides = [int(f.removeprefix("gram")) for f in flags if f.startswith("gram") and f[4:].isdigit()]
    by = [StructuredMethod(f.removeprefix("by")) for f in flags if f.startswith("by")]
    unknown = {f for f in flags if not (f.startswith(("gram", "by")))} - {"refit", "global"}
    if unknown:
        raise ValueError(f"unknown variant flag(s) {sorted(unknown)} in {text!r}")
    if strides:
        options["gram_stride"] = strides[0]
    if by:
        options["allocate_by"] = by[0]
    return ShrinkConfig(
        ratio=ratio,
        units=units,
        method=StructuredMethod(method),
        refit="refit" in flags,
        allocate="global" if "global" in flags else "uniform",
        **options,  # type: ignore[arg-type]
    )
