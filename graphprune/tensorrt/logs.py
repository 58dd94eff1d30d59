"""What a TensorRT build says, captured and parsed: the log's sparsity lines and the engine's layers and tactics.

Pure functions over text, so they are tested without TensorRT. Sources, in the order a build can offer them:

* the builder log's two "(Sparsity)" lines (full TensorRT with ``SPARSE_WEIGHTS``): eligible layers, and the
  layers whose chosen implementation is sparse;
* the builder log's verbose layer list ("Layers:" then one ``Name: ..., LayerType: ..., TacticName: ...`` line per
  engine layer), which TensorRT-RTX prints at the end of an ahead-of-time build with detailed profiling verbosity;
* the engine inspector's JSON (needs the engine deserialised, so a GPU).

Nothing here decides that a layer runs sparse unless one of these sources says so.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from graphprune.errors import GraphpruneError

_ELIGIBLE_RE = re.compile(r"\(Sparsity\)\s*Layers eligible for sparse math:\s*(.*)$")
_PICKED_RE = re.compile(r"\(Sparsity\)\s*TRT inference plan picked sparse implementation for layers:\s*(.*)$")
_SPARSE_WORD_RE = re.compile(r"sparse|sparsity", re.IGNORECASE)
_LAYER_LINE_RE = re.compile(
    r"^Name: (?P<name>.*?), LayerType: (?P<type>[^,]*), .*TacticName: (?P<tactic>[^,]*), StreamId: [^,]*, "
    r"Metadata:(?P<meta>.*)$"
)
_IO_LINE_RE = re.compile(
    r"^Name: (?P<name>.*?), IOMode: (?P<mode>\w+), DataType: (?P<dtype>\w+), Dimensions: \[(?P<dims>[^\]]*)\]"
)
_IO_PROFILE_RE = re.compile(r"MinShape: \[([^\]]*)\], OptShape: \[([^\]]*)\], MaxShape: \[([^\]]*)\]")
SEVERITIES = ("E", "W", "I", "V")  # error (internal errors too), warning, info, verbose


@dataclass(frozen=True)
class LogLine:
    severity: str  # one of SEVERITIES
    text: str


def capturing_logger(trt: Any) -> Any:
    """An ILogger of ``trt`` that keeps every message, verbose included, in ``.lines`` (it prints nothing)."""
    tags = {
        trt.ILogger.Severity.INTERNAL_ERROR: "E",
        trt.ILogger.Severity.ERROR: "E",
        trt.ILogger.Severity.WARNING: "W",
        trt.ILogger.Severity.INFO: "I",
        trt.ILogger.Severity.VERBOSE: "V",
    }

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.lines: list[LogLine] = []

        def log(self, severity: Any, msg: str) -> None:
            self.lines.append(LogLine(tags.get(severity, "V"), msg))

    return _Logger()


@dataclass(frozen=True)
class SparsityLog:
    """The two sparsity lines of a TensorRT build log."""

    eligible: tuple[str, ...]  # layers whose weights TensorRT found 2:4 structured
    picked: tuple[str, ...]  # layers for which the engine uses a sparse implementation
    seen: bool  # whether the log had the lines at all (absent when SPARSE_WEIGHTS was off, or TensorRT-RTX)


def parse_sparsity_log(lines: Iterable[str]) -> SparsityLog:
    """Extract the "(Sparsity)" lines, with or without trtexec's ``[date] [I] [TRT]`` prefix.

    Layer names are separated by ", "; fused layers ("a + b") stay one name. Later lines replace earlier ones
    (a build with several profiles or retries logs them again).
    """
    eligible: tuple[str, ...] = ()
    picked: tuple[str, ...] = ()
    seen = False
    for line in lines:
        line = line.rstrip()
        if match := _ELIGIBLE_RE.search(line):
            eligible, seen = _layer_list(match.group(1)), True
        elif match := _PICKED_RE.search(line):
            picked, seen = _layer_list(match.group(1)), True
    return SparsityLog(eligible, picked, seen)


def _layer_list(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(", ") if name.strip())


def sparsity_mentions(lines: Iterable[LogLine]) -> list[str]:
    """Every log line that mentions sparsity, verbatim with its severity tag ("[I] (Sparsity) ...").

    The verbose layer list is left out (its tactic names are reported per layer instead).
    """
    return [
        f"[{line.severity}] {line.text}"
        for line in lines
        if _SPARSE_WORD_RE.search(line.text) and not line.text.startswith("Layers:")
    ]


@dataclass(frozen=True, kw_only=True)
class LayerInfo:
    """One engine layer as the builder or the engine inspector describes it."""

    name: str
    layer_type: str
    tactic: str
    sparse_tactic: bool  # the tactic's name says "sparse": the only per-layer evidence of a sparse kernel
    origin: str  # ONNX node(s) it came from (the Metadata field), when present
    precision: str = ""  # as its ONNX origin shows it (tensorrt/layer_precision.py): int8, fp8, int4, float16...
    precision_from: str = ""  # where that precision was read


def _layer(name: str, layer_type: str, tactic: str, origin: str) -> LayerInfo:
    return LayerInfo(
        name=name, layer_type=layer_type, tactic=tactic, sparse_tactic="sparse" in tactic.lower(), origin=origin
    )


def _last_layer_list(lines: Iterable[LogLine]) -> list[str]:
    """The rows of the builder's last verbose "Layers:" message (a build may print several), stripped."""
    rows: list[str] = []
    for line in lines:
        if line.severity == "V" and line.text.startswith("Layers:"):
            rows = [row.strip() for row in line.text.splitlines()[1:]]
    return rows


def parse_builder_layers(lines: Iterable[LogLine]) -> list[LayerInfo]:
    """Layers of the builder's verbose "Layers:" message, or [] when it printed none."""
    return [
        _layer(match["name"], match["type"], match["tactic"].strip(), match["meta"].strip())
        for row in _last_layer_list(lines)
        if (match := _LAYER_LINE_RE.match(row))
    ]


@dataclass(frozen=True, kw_only=True)
class EngineIO:
    """One engine input or output as the builder's verbose layer list describes it."""

    name: str
    mode: str  # Input or Output
    dtype: str
    dims: tuple[int, ...]  # -1 where dynamic
    profiles: tuple[dict[str, list[int]], ...]  # per optimisation profile: min/opt/max, for dynamic inputs


def parse_builder_io(lines: Iterable[LogLine]) -> list[EngineIO]:
    """The "I/O Tensors:" section of the builder's verbose "Layers:" message."""
    tensors = []
    for row in _last_layer_list(lines):
        if match := _IO_LINE_RE.match(row):
            profiles = tuple(
                {"min": _dims(lo), "opt": _dims(opt), "max": _dims(hi)}
                for lo, opt, hi in _IO_PROFILE_RE.findall(row)
            )
            tensors.append(
                EngineIO(
                    name=match["name"],
                    mode=match["mode"],
                    dtype=match["dtype"],
                    dims=tuple(_dims(match["dims"])),
                    profiles=profiles,
                )
            )
    return tensors


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d.strip()]


def parse_inspector_json(text: str) -> list[LayerInfo]:
    """Layers of ``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)``.

    With LAYER_NAMES_ONLY verbosity the layers are bare strings (no tactic: never reported sparse). The I/O tensor
    section (``Bindings`` in 10.x, ``I/O Tensors`` in 11.x) is not needed here.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GraphpruneError(f"engine inspector output is not JSON ({exc.msg})") from None
    layers = []
    for entry in data.get("Layers", []):
        if isinstance(entry, str):
            layers.append(_layer(entry, "", "", ""))
            continue
        layers.append(
            _layer(
                str(entry.get("Name", "")),
                str(entry.get("LayerType", "")),
                str(entry.get("TacticName", "")),
                str(entry.get("Metadata", "")),
            )
        )
    return layers
