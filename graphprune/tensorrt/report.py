"""The build report saved beside an engine as ``<engine>.json``, and the one sentence it says about sparsity."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from graphprune.tensorrt.logs import LayerInfo, SparsityLog


@dataclass(kw_only=True)
class Sparsity:
    """What the build said about sparse kernels, with where each fact comes from."""

    flag: bool  # SPARSE_WEIGHTS was set
    lines: list[str]  # every builder log line that mentions sparsity, verbatim ("[I] (Sparsity) ...")
    eligible_layers: list[str]  # from the "(Sparsity) Layers eligible ..." line
    sparse_layers: list[str]  # from the "(Sparsity) ... picked sparse implementation ..." line
    sparse_tactic_layers: list[str]  # layers whose tactic name says sparse (layers_source)
    verdict: str  # one sentence built only from the above


@dataclass(kw_only=True)
class BuildReport:
    """What a build did."""

    onnx: str
    engine: str
    engine_bytes: int
    backend: str  # the --backend name
    product: str  # "TensorRT" or "TensorRT-RTX"
    version: str
    gpu: str
    precision: str  # what the engine computes in
    strongly_typed: bool
    flags: list[str]  # BuilderFlag names set
    profiles: list[dict[str, dict[str, list[int]]]]  # one per optimisation profile: input -> min/opt/max
    build_seconds: float
    parser: dict[str, int]  # ONNX nodes in the file, layers in the parsed network
    sparsity: Sparsity
    layers_source: str  # where `layers` comes from: builder log, engine inspector, or "" (none available)
    layers: list[dict[str, Any]] = field(default_factory=list)
    layer_precision_note: str = ""  # what the layers' precision fields mean for this backend
    engine_io: list[dict[str, Any]] = field(default_factory=list)  # the engine's I/O and profiles (builder log)
    header_check: str = ""  # what the runtime said about the serialized engine's header
    warnings: list[str] = field(default_factory=list)  # graphprune's own, one line each
    builder_warnings: list[str] = field(default_factory=list)  # the builder's warning lines, verbatim
    note: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def report_path(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name + ".json")


def sparsity_verdict(
    product: str,
    flag: bool,
    log: SparsityLog,
    layers: list[LayerInfo],
    layers_source: str,
    deferred_line: str | None,
) -> str:
    """One sentence on which layers run sparse, claiming nothing that no log line or layer entry says.

    ``deferred_line`` is the builder's own line saying kernels are chosen at load time, when it printed one.
    """
    if not flag:
        return "SPARSE_WEIGHTS was off: a dense build"
    sparse_tactics = [layer.name for layer in layers if layer.sparse_tactic]
    if log.seen:
        return (
            f"builder log: {len(log.picked)} of {len(log.eligible)} layers eligible for sparse math picked a "
            "sparse implementation"
        )
    if sparse_tactics:
        return (
            f"{len(sparse_tactics)} layers have a sparse tactic ({layers_source}); "
            "the builder logged no (Sparsity) line"
        )
    said = f"the {product} builder logged no (Sparsity) line"
    if layers:
        said += f" and none of the {len(layers)} layers in the {layers_source} has a sparse tactic"
    if deferred_line:
        return (
            f'{said}; it chooses kernels when the engine is loaded on the target GPU ("{deferred_line}"), '
            "so which layers run sparse is not known at build time"
        )
    return f"{said}: no layer is known to run sparse"
