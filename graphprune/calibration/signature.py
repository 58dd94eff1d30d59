"""The model's input signature, and the one-line check of a feed against it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from graphprune.errors import GraphpruneError, a_few

Feed = dict[str, np.ndarray]
Dim = int | str | None  # a fixed size, a named dynamic dimension, or an unnamed one


@dataclass(frozen=True)
class InputSpec:
    """One graph input that a feed must provide."""

    name: str
    dtype: np.dtype
    dims: tuple[Dim, ...] | None  # None: rank unknown

    def describe(self) -> str:
        if self.dims is None:
            return f"{self.name}: {self.dtype.name}[...]"
        return f"{self.name}: {self.dtype.name}[{', '.join('?' if d is None else str(d) for d in self.dims)}]"


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a feed must provide: graph inputs that are not initializers."""
    initializers = {i.name for i in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        if not vi.type.HasField("tensor_type"):
            raise GraphpruneError(f"model input {vi.name!r} is not a tensor; graphprune feeds tensors only")
        tt = vi.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        dims: tuple[Dim, ...] | None = None
        if tt.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, dtype, dims))
    return specs


def feed_samples(feed: Mapping[str, np.ndarray]) -> int:
    """Number of samples in a feed: the leading dimension of its first array that has one."""
    for a in feed.values():
        if a.ndim:
            return int(a.shape[0])
    return 1


def validate_feed(feed: Mapping[str, object], specs: Sequence[InputSpec], where: str) -> Feed:
    """Return the feed as numpy arrays, or raise a one-line GraphpruneError naming what does not match."""
    if not isinstance(feed, Mapping):
        raise GraphpruneError(f"{where}: expected a dict of input name -> array, got {type(feed).__name__}")
    by_name = {s.name: s for s in specs}
    unknown = [n for n in feed if n not in by_name]
    if unknown:
        raise GraphpruneError(
            f"{where}: {unknown[0]!r} is not an input of the model (inputs: {a_few(list(by_name)) or 'none'})"
        )
    missing = [n for n in by_name if n not in feed]
    if missing:
        raise GraphpruneError(
            f"{where}: missing model input(s) {a_few([repr(m) for m in missing])} "
            f"(the model takes {a_few([s.describe() for s in specs])})"
        )
    out: Feed = {}
    for name, value in feed.items():
        spec = by_name[name]
        a = np.asarray(value)
        if a.dtype != spec.dtype:
            raise GraphpruneError(
                f"{where}: input {name!r} is {a.dtype.name}, the model expects {spec.dtype.name} "
                f"(convert it, e.g. array.astype(np.{spec.dtype.name}))"
            )
        if spec.dims is not None:
            if a.ndim != len(spec.dims):
                raise GraphpruneError(
                    f"{where}: input {name!r} has rank {a.ndim} (shape {list(a.shape)}), "
                    f"the model expects rank {len(spec.dims)} ({spec.describe()})"
                )
            for axis, (got, want) in enumerate(zip(a.shape, spec.dims, strict=True)):
                if isinstance(want, int) and want > 0 and got != want:
                    raise GraphpruneError(
                        f"{where}: input {name!r} has shape {list(a.shape)}, "
                        f"the model fixes axis {axis} to {want} ({spec.describe()})"
                    )
        out[name] = a
    return out
