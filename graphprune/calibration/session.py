"""Part of an onnx-ir model as an ONNX Runtime session, holding no second copy of the weights.

:func:`cut` keeps only the nodes that the wanted values depend on (graph outputs, heads and everything downstream
of them are left out). :func:`open_session` serialises that view without weight bytes: weights in files stay
external references that ONNX Runtime reads itself; weights in memory are handed to ONNX Runtime as OrtValues
over the same buffers (``SessionOptions.add_external_initializers``), so the protobuf holds only the graph.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from graphprune.calibration.providers import import_ort, session_options
from graphprune.errors import GraphpruneError

_INLINE_BYTES = 1024  # smaller tensors travel inside the protobuf
_SHAPE_INFERENCE_ELEMENTS = 4096  # initializers at most this large keep their values for shape inference
_IN_MEMORY = "graphprune-in-memory"  # location of a stub whose values come as an OrtValue
_EXTERNAL_FOLDER = "session.model_external_initializers_file_folder_path"
# numpy dtypes onnxruntime wraps without conversion (bfloat16, float8 and 4-bit tensors travel inline)
_ORT_NUMPY_TYPES = frozenset(
    getattr(ir.DataType, n)
    for n in (
        "FLOAT",
        "DOUBLE",
        "FLOAT16",
        "INT8",
        "UINT8",
        "INT16",
        "UINT16",
        "INT32",
        "UINT32",
        "INT64",
        "UINT64",
        "BOOL",
    )
)


def values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    """The main graph's named tensors: inputs, initializers and node outputs."""
    named: dict[str, ir.Value] = {str(v.name): v for v in graph.inputs if v.name}
    named.update(graph.initializers)
    for node in graph:
        named.update((str(v.name), v) for v in node.outputs if v.name)
    return named


def outer_reads(node: ir.Node) -> list[ir.Value]:
    """The values ``node`` reads: its inputs, and the outer-scope values its subgraphs read."""
    reads = [v for v in node.inputs if v is not None]
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            subgraphs = [attr.value]
        elif attr.type == ir.AttributeType.GRAPHS:
            subgraphs = list(attr.value)
        else:
            continue
        for sub in subgraphs:
            inner = set(sub.all_nodes())
            for inner_node in inner:
                for v in inner_node.inputs:
                    if v is None or v in sub.inputs or v.name in sub.initializers:
                        continue
                    producer = v.producer()
                    if producer is None or producer not in inner:
                        reads.append(v)
    return reads


def cut(graph: ir.Graph, wanted: Iterable[ir.Value], available: Iterable[ir.Value] = ()) -> list[ir.Node]:
    """The nodes of ``graph`` that compute ``wanted`` from the graph inputs and ``available``, in graph order."""
    stop = set(available)
    needed: set[ir.Node] = set()
    stack = [v for v in wanted if v not in stop]
    while stack:
        node = stack.pop().producer()
        if node is None or node in needed or node.graph is not graph:
            continue
        needed.add(node)
        stack.extend(v for v in outer_reads(node) if v not in stop)
    return [node for node in graph if node in needed]


@dataclass
class SessionModel:
    """A weightless ModelProto and the in-memory weights ONNX Runtime will read in place."""

    proto: onnx.ModelProto
    injected: dict[str, np.ndarray] = field(default_factory=dict)
    external_dir: Path | None = None


def session_model(
    model: ir.Model,
    nodes: Sequence[ir.Node],
    inputs: Sequence[ir.Value],
    outputs: Sequence[ir.Value],
    constants: Sequence[ir.Value] = (),
) -> SessionModel:
    """``nodes`` (and ``constants``, small initializers they add) as a model whose weights stay where they are."""
    graph = model.graph
    read = {id(v) for n in nodes for v in outer_reads(n)}
    stored = [v for v in graph.initializers.values() if id(v) in read and v not in inputs]
    kept, stubs, small, injected = [*constants], [], [], {}
    folder: Path | None = None  # onnxruntime reads external data from one folder; others come in memory
    for value in stored:
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and tensor.nbytes <= _INLINE_BYTES:
            small.append(value)  # onnxruntime's shape inference reads small constants, never from files
            continue
        if isinstance(tensor, ir.ExternalTensor):
            here = Path(tensor.base_dir).resolve()
            folder = folder or here
            if here == folder:
                kept.append(value)
                continue
        if tensor is None or tensor.nbytes <= _INLINE_BYTES or tensor.dtype not in _ORT_NUMPY_TYPES:
            kept.append(value)
        else:
            stubs.append(value)
            injected[str(value.name)] = np.ascontiguousarray(tensor.numpy())
    view = ir.GraphView(inputs, outputs, nodes=nodes, initializers=kept, name="graphprune")
    proto = onnx.ModelProto(ir_version=model.ir_version)
    for domain, version in model.opset_imports.items():
        proto.opset_import.add(domain=domain, version=version)
    proto.functions.extend(ir.serde.serialize_function(f) for f in model.functions.values())
    ir.serde.serialize_graph_into(proto.graph, view)  # type: ignore[arg-type]  # onnx-ir's GraphView misses its own protocol as typed
    for value in stubs:
        _stub(proto.graph.initializer.add(), value)
    for value in small:
        assert value.const_value is not None
        inline = ir.Tensor(value.const_value.numpy(), name=value.name)
        ir.serde.serialize_tensor_into(proto.graph.initializer.add(), inline)
    return SessionModel(proto, injected, folder)


def _stub(proto: onnx.TensorProto, value: ir.Value) -> None:
    tensor = value.const_value
    assert tensor is not None
    proto.name = str(value.name)
    proto.data_type = tensor.dtype.value
    proto.dims.extend(int(d) for d in tensor.shape.numpy())
    proto.data_location = onnx.TensorProto.EXTERNAL
    entry = proto.external_data.add()
    entry.key, entry.value = "location", _IN_MEMORY


class Session:
    """An ONNX Runtime session and the in-memory weights it reads (kept alive as long as the session)."""

    def __init__(self, model: SessionModel, providers: list[str], optimize: bool = False) -> None:
        ort = import_ort()
        options = session_options(optimize)
        if model.external_dir is not None:
            options.add_session_config_entry(_EXTERNAL_FOLDER, os.fspath(model.external_dir))
        self._values = [ort.OrtValue.ortvalue_from_numpy(a) for a in model.injected.values()]
        if self._values:
            options.add_external_initializers(list(model.injected), self._values)
        self._arrays = model.injected
        try:
            self.session: Any = ort.InferenceSession(model.proto.SerializeToString(), options, providers=providers)
        except Exception as exc:
            raise GraphpruneError(f"onnxruntime cannot run the model: {str(exc).splitlines()[0]}") from None
        if isinstance(getattr(self.session, "_model_bytes", None), bytes):
            # onnxruntime's wrapper keeps the bytes to re-create the session on a provider fallback; never used
            self.session._model_bytes = None

    def run(self, names: list[str], feed: dict[str, np.ndarray], label: str) -> list[np.ndarray]:
        """The outputs ``names`` on ``feed``; a failure is one line that starts with ``label`` (which data)."""
        try:
            return self.session.run(names, feed)
        except Exception as exc:
            raise GraphpruneError(f"{label}: onnxruntime failed: {str(exc).splitlines()[0]}") from None

    def providers(self) -> list[str]:
        return list(self.session.get_providers())
