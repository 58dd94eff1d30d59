"""Optimisation profiles: ``--shapes NAME:MIN,OPT,MAX`` (or ``NAME:SHAPE``, a static profile with MIN = OPT = MAX)
parsed and checked against the ONNX model's inputs.

Checked from the ONNX file alone, before any TensorRT is imported, so a profile that does not fit the model is a
one-line error in a second, not a failed build.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import onnx

from graphprune.errors import GraphpruneError

_DIMS_RE = re.compile(r"^\d+(x\d+)*$")


@dataclass(frozen=True)
class ShapeRange:
    """One dynamic input's optimisation-profile shapes."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def as_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def parse_shapes(specs: Iterable[str]) -> dict[str, ShapeRange]:
    """``["input_ids:1x16,8x128,32x512"]`` -> ``{"input_ids": ShapeRange(...)}``, one-line errors otherwise.

    The name is everything before the last ``:`` (ONNX names may contain colons); dims are joined by ``x``. One
    shape instead of three (``images:1x3x320x320``) is a static profile: MIN = OPT = MAX.
    """
    ranges: dict[str, ShapeRange] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        parts = dims.replace(" ", "").split(",")
        if not sep or not name or len(parts) not in (1, 3) or not all(_DIMS_RE.match(p) for p in parts):
            raise GraphpruneError(
                f"invalid `shapes` entry {spec!r}: expected NAME:MIN,OPT,MAX or NAME:SHAPE, "
                "e.g. input_ids:1x16,8x128,32x512 or images:1x3x640x640"
            )
        lo, opt, hi = (tuple(int(d) for d in p.split("x")) for p in parts * (3 // len(parts)))
        if not (len(lo) == len(opt) == len(hi)):
            raise GraphpruneError(f"invalid `shapes` entry {spec!r}: MIN, OPT and MAX need the same rank")
        if not all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)):
            raise GraphpruneError(f"invalid `shapes` entry {spec!r}: need MIN <= OPT <= MAX in every dimension")
        if name in ranges:
            raise GraphpruneError(f"`shapes` gives {name!r} twice")
        ranges[name] = ShapeRange(name, lo, opt, hi)
    return ranges


def model_inputs(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """The graph's real inputs (initializers listed as inputs excluded): name -> dims, ``None`` where dynamic."""
    constants = {t.name for t in model.graph.initializer}
    inputs = {}
    for value in model.graph.input:
        if value.name in constants:
            continue
        dims = value.type.tensor_type.shape.dim
        inputs[value.name] = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims
        )
    return inputs


def check_profiles(inputs: dict[str, tuple[int | None, ...]], ranges: dict[str, ShapeRange]) -> None:
    """Every range names an input, has its rank and keeps its static dims; every dynamic input has a range."""
    for name, r in ranges.items():
        if name not in inputs:
            raise GraphpruneError(f"`shapes` names {name!r}, not an input of the model (inputs: {sorted(inputs)})")
        dims = inputs[name]
        if len(r.opt) != len(dims):
            raise GraphpruneError(
                f"`shapes` gives {name} rank {len(r.opt)}, but the input has rank {len(dims)} ({_show(dims)})"
            )
        for axis, fixed in enumerate(dims):
            if fixed is not None and not (r.min[axis] == r.opt[axis] == r.max[axis] == fixed):
                raise GraphpruneError(
                    f"`shapes` gives {name}: dimension {axis} is fixed to {fixed} in the model ({_show(dims)}), "
                    f"the profile gives {r.min[axis]},{r.opt[axis]},{r.max[axis]}"
                )
    for name, dims in inputs.items():
        if None in dims and name not in ranges:
            example = "x".join("1" if d is None else str(d) for d in dims)
            raise GraphpruneError(
                f"input {name!r} has dynamic dimensions ({_show(dims)}): give `shapes` NAME:MIN,OPT,MAX, "
                f"e.g. {name}:{example},{example},{example} with the ? dimensions filled in"
            )


def _show(dims: tuple[int | None, ...]) -> str:
    return "x".join("?" if d is None else str(d) for d in dims)
