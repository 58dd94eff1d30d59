"""The shrink benchmarks' names for configurations: ``METHOD[+refit][+global]`` (e.g. ``flap+refit+global``).

Without ``+refit`` the consumers get only what the method itself does (flap's bias fold); without ``+global`` every
group loses the same ratio (uniform).
"""

from __future__ import annotations

from graphprune.algorithms.structured import StructuredMethod
from graphprune.pipeline.shrink import ShrinkConfig


def variant(text: str, ratio: float, units: tuple[str, ...], **options: object) -> ShrinkConfig:
    """The configuration ``text`` names, removing ``ratio`` of the ``units``; ``options`` set other fields."""
    method, *flags = text.split("+")
    unknown = set(flags) - {"refit", "global"}
    if unknown:
        raise ValueError(f"unknown variant flag(s) {sorted(unknown)} in {text!r}")
    return ShrinkConfig(
        ratio=ratio,
        units=units,
        method=StructuredMethod(method),
        refit="refit" in flags,
        allocate="global" if "global" in flags else "uniform",
        **options,  # type: ignore[arg-type]
    )
