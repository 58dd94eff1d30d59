"""Random calibration inputs synthesised from the model's signature, when the user has no data.

Token ids are drawn within the range of the embedding table they index (the Gather whose indices are the
input), ``attention_mask`` is ones, ``position_ids`` counts 0..n-1, other integer inputs are zeros, float inputs
are standard normal. Dynamic dimensions come from ``shapes`` (``--shape name=1x128``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from graphprune.calibration.data import Labelled, Source
from graphprune.calibration.signature import InputSpec
from graphprune.errors import GraphpruneError

# Ops that pass index values through unchanged on the way to an embedding Gather.
_PASS_THROUGH = {"Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten"}


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``name=1x128`` -> ("name", (1, 128))."""
    name, sep, dims = text.rpartition("=")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x")) if sep and name else ()
    except ValueError:
        shape = ()
    if not shape or any(d < 0 for d in shape):
        raise GraphpruneError(f"`shapes` {text!r}: expected NAME=DIMS such as input_ids=1x128")
    return name, shape


def embedding_sizes(model: ir.Model) -> dict[str, int]:
    """For each tensor used (directly or through value-preserving ops) as Gather indices into a stored table,
    the number of rows of that table."""
    sizes: dict[str, int] = {}
    for node in model.graph:
        if node.op_type != "Gather" or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        table = _stored(node.inputs[0])
        if table is None:
            continue
        axis = node.attributes.get_int("axis", 0)
        dims = table.shape.numpy()
        rows = int(dims[axis % len(dims)]) if dims else 0
        indices: ir.Value | None = node.inputs[1]
        for _ in range(8):
            assert indices is not None
            name = str(indices.name)
            sizes[name] = min(sizes.get(name, rows), rows)
            producer = indices.producer()
            if producer is None or producer.op_type not in _PASS_THROUGH:
                break
            indices = producer.inputs[0]
    return sizes


def _stored(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The tensor behind an initializer or a Constant node's output, else None."""
    if value is None:
        return None
    if value.const_value is not None and value.is_initializer():
        return value.const_value
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return producer.attributes["value"].as_tensor()
    return None


# One feed's arrays above this are refused before they are allocated: a shape or batch typed with a few digits too
# many would otherwise fail inside numpy (a traceback) or push the machine into swap.
MAX_FEED_BYTES = 8 << 30


def check_feed_bytes(shapes: Iterable[Sequence[int]], asks: str, remedy: str) -> None:
    """Refuse a feed whose arrays would take more than :data:`MAX_FEED_BYTES`, counted at 8 bytes an element
    (numpy draws random numbers and token ids as 64-bit values before any cast)."""
    need = sum(math.prod(shape) for shape in shapes) * 8
    if need > MAX_FEED_BYTES:
        raise GraphpruneError(
            f"{asks} {need / 2**30:,.0f} GiB of input per run, above the {MAX_FEED_BYTES >> 30} GiB "
            f"graphprune allocates for one: {remedy}"
        )


class SyntheticSource(Source):
    """``ceil(nsamples / batch)`` random feeds shaped by the model's signature and ``shapes``."""

    def __init__(
        self,
        model: ir.Model | onnx.ModelProto,
        specs: Sequence[InputSpec],
        shapes: Mapping[str, Sequence[int]],
        *,
        nsamples: int,
        seed: int,
    ) -> None:
        super().__init__()
        unknown = [n for n in shapes if n not in {s.name for s in specs}]
        if unknown:
            raise GraphpruneError(f"`shapes` names {unknown[0]}: the model has no such input")
        self.specs = specs
        self.shapes = {s.name: _resolve(s, shapes.get(s.name)) for s in specs}
        check_feed_bytes(self.shapes.values(), "`shapes` asks for", "give smaller shapes")
        self.vocab = embedding_sizes(model if isinstance(model, ir.Model) else ir.from_proto(model))
        self.seed = seed
        batch = next((sh[0] for sh in self.shapes.values() if sh), 1) or 1
        self.feeds = max(1, math.ceil(nsamples / batch))
        self.total = self.feeds * batch
        self.warnings.append(
            "no calibration data: synthesising random inputs from the model's signature "
            f"({'; '.join(f'{n}: {list(sh)}' for n, sh in self.shapes.items())}); real data gives better masks"
        )

    def __iter__(self) -> Iterator[Labelled]:
        rng = np.random.default_rng(self.seed)
        for i in range(self.feeds):
            yield f"synthetic feed {i}", {s.name: self._make(s, rng) for s in self.specs}

    def _make(self, spec: InputSpec, rng: np.random.Generator) -> np.ndarray:
        shape = self.shapes[spec.name]
        if spec.dtype == np.bool_:
            return np.ones(shape, dtype=bool)
        if np.issubdtype(spec.dtype, np.integer):
            if spec.name in self.vocab:
                return rng.integers(0, max(self.vocab[spec.name], 1), size=shape).astype(spec.dtype)
            if spec.name == "attention_mask":
                return np.ones(shape, dtype=spec.dtype)
            if spec.name == "position_ids" and shape:
                return np.broadcast_to(np.arange(shape[-1], dtype=spec.dtype), shape).copy()
            return np.zeros(shape, dtype=spec.dtype)
        return rng.standard_normal(size=shape).astype(spec.dtype)


def _resolve(spec: InputSpec, given: Sequence[int] | None) -> tuple[int, ...]:
    if given is not None:
        if spec.dims is not None and len(given) != len(spec.dims):
            raise GraphpruneError(
                f"`shapes` gives {spec.name} rank {len(given)}, the model expects {spec.describe()}"
            )
        for got, want in zip(given, spec.dims or (), strict=False):
            if isinstance(want, int) and want > 0 and got != want:
                raise GraphpruneError(
                    f"`shapes` gives {spec.name}={'x'.join(map(str, given))}: the model fixes {spec.describe()}"
                )
        return tuple(given)
    if spec.dims is not None and all(isinstance(d, int) and d > 0 for d in spec.dims):
        return tuple(int(d) for d in spec.dims)  # type: ignore[arg-type]  # all ints: checked on the line above
    example = "x".join(
        str(d) if isinstance(d, int) and d > 0 else ("1" if i == 0 else "128")
        for i, d in enumerate(spec.dims or (None, None))
    )
    raise GraphpruneError(
        f"input {spec.describe()} has dynamic dimensions: give its size in `shapes`, e.g. {spec.name}={example}"
    )
