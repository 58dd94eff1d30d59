"""A YOLOv8 detector with dynamic input shapes, made from the static Ultralytics export a package ships.

PyPI's YOLOv8 ONNX files are static exports: the anchor grid and strides of the detection head are constants for
one image size. Ultralytics' ``dynamic=True`` export computes them from the feature maps' shapes instead
(``make_anchors``: Shape -> Cast(float) -> Range -> + 0.5 -> mesh grid; strides with ``torch.full``), which is the
shape arithmetic an FP16 conversion must leave in FP32. :func:`dynamic_yolov8` rebuilds that head on the shipped
weights: batch, height and width become dynamic (any multiple of 32), the Reshapes copy the batch (``0``) and
infer the anchor count (``-1``). At the export's own size it computes exactly what the static file computes.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

STRIDES = (8, 16, 32)


def dynamic_yolov8(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a static Ultralytics YOLOv8 detection export with dynamic batch/height/width (see the module)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    anchors = _constants_read_by(graph, inits, lambda a: a.ndim == 3 and a.shape[:2] == (1, 2))
    strides = _constants_read_by(graph, inits, lambda a: a.ndim == 2 and a.shape[0] == 1 and a.shape[1] > 1)
    count = numpy_helper.to_array(inits[next(iter(anchors))]).shape[2]
    levels = []
    for node in graph.node:
        if node.op_type == "Reshape":
            shape = numpy_helper.to_array(inits[node.input[1]]).copy()
            if len(shape) == 3 and shape[0] in (0, 1) and shape[1] == 64:  # a level's box branch, in level order
                levels.append(node.input[0])
            shape[0] = 0  # the batch, copied from the input
            shape[shape == count] = -1  # the anchor count
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(shape.astype(np.int64), node.input[1]))
    if len(levels) != len(STRIDES):
        raise ValueError(f"expected {len(STRIDES)} box branches, found {len(levels)}")
    nodes, consts = _make_anchors(levels)
    graph.initializer.extend(consts)
    for node in graph.node:
        for position, name in enumerate(node.input):
            if name in anchors | strides:
                node.input[position] = "dyn_anchors" if name in anchors else "dyn_strides"
    first_reader = min(i for i, n in enumerate(graph.node) if {"dyn_anchors", "dyn_strides"} & set(n.input))
    for offset, node in enumerate(nodes):
        graph.node.insert(first_reader + offset, node)
    unused = anchors | strides
    kept = [t for t in graph.initializer if t.name not in unused]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.value_info[:]
    dims = graph.input[0].type.tensor_type.shape.dim
    for dim, name in zip(dims, ("batch", None, "height", "width"), strict=True):
        if name:
            dim.Clear()
            dim.dim_param = name
    out_dims = graph.output[0].type.tensor_type.shape.dim
    out_dims[0].Clear()
    out_dims[0].dim_param = "batch"
    out_dims[2].Clear()
    out_dims[2].dim_param = "anchors"
    return out


def _constants_read_by(graph: onnx.GraphProto, inits: dict[str, onnx.TensorProto], test) -> set[str]:  # type: ignore[no-untyped-def]
    """The float constants the graph reads that pass ``test``: copies of one array (the exporter may repeat it)."""
    found = {
        name
        for node in graph.node
        for name in node.input
        if name in inits
        and inits[name].data_type == TensorProto.FLOAT
        and test(numpy_helper.to_array(inits[name]))
    }
    arrays = [numpy_helper.to_array(inits[name]) for name in sorted(found)]
    if not arrays or any(not np.array_equal(a, arrays[0]) for a in arrays):
        raise ValueError(f"expected copies of one constant in the head, found {sorted(found)}")
    return found


def _make_anchors(levels: list[str]) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Ultralytics' ``make_anchors(feats, strides, 0.5)`` as its dynamic export writes it at opset 12: anchors
    ``[1, 2, A]`` (x then y, cell centres in grid units) and strides ``[1, A]``."""
    consts = [
        numpy_helper.from_array(np.array(2, np.int64), "dyn_i2"),
        numpy_helper.from_array(np.array(3, np.int64), "dyn_i3"),
        numpy_helper.from_array(np.array([1], np.int64), "dyn_one_i"),
        numpy_helper.from_array(np.array([-1, 2], np.int64), "dyn_pairs"),
        numpy_helper.from_array(np.array(0.0, np.float32), "dyn_zero"),
        numpy_helper.from_array(np.array(1.0, np.float32), "dyn_one"),
        numpy_helper.from_array(np.array(0.5, np.float32), "dyn_half"),
    ]
    nodes: list[onnx.NodeProto] = []

    def node(op: str, inputs: list[str], name: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, inputs, [name], name=f"/dyn/{name}", **attrs))
        return name

    points, strides = [], []
    for level, (feature, stride) in enumerate(zip(levels, STRIDES, strict=True)):
        p = f"dyn_l{level}"
        shape = node("Shape", [feature], f"{p}_shape")
        h = node("Gather", [shape, "dyn_i2"], f"{p}_h", axis=0)
        w = node("Gather", [shape, "dyn_i3"], f"{p}_w", axis=0)
        sx = node(
            "Add",
            [node("Range", ["dyn_zero", node("Cast", [w], f"{p}_wf", to=1), "dyn_one"], f"{p}_rx"), "dyn_half"],
            f"{p}_sx",
        )
        sy = node(
            "Add",
            [node("Range", ["dyn_zero", node("Cast", [h], f"{p}_hf", to=1), "dyn_one"], f"{p}_ry"), "dyn_half"],
            f"{p}_sy",
        )
        hw = node(
            "Concat",
            [node("Unsqueeze", [h], f"{p}_h1", axes=[0]), node("Unsqueeze", [w], f"{p}_w1", axes=[0])],
            f"{p}_hw",
            axis=0,
        )
        gx = node("Expand", [node("Unsqueeze", [sx], f"{p}_sx2", axes=[0]), hw], f"{p}_gx")
        gy = node("Expand", [node("Unsqueeze", [sy], f"{p}_sy2", axes=[1]), hw], f"{p}_gy")
        xy = node(
            "Concat",
            [node("Unsqueeze", [gx], f"{p}_gx3", axes=[-1]), node("Unsqueeze", [gy], f"{p}_gy3", axes=[-1])],
            f"{p}_xy",
            axis=-1,
        )
        points.append(node("Reshape", [xy, "dyn_pairs"], f"{p}_points"))
        cells = node(
            "Concat",
            [node("Unsqueeze", [node("Mul", [h, w], f"{p}_n")], f"{p}_n1", axes=[0]), "dyn_one_i"],
            f"{p}_cells",
            axis=0,
        )
        fill = numpy_helper.from_array(np.array([stride], np.float32), "value")
        strides.append(node("ConstantOfShape", [cells], f"{p}_stride", value=fill))
    anchor_points = node("Concat", points, "dyn_points", axis=0)
    node("Unsqueeze", [node("Transpose", [anchor_points], "dyn_points_t", perm=[1, 0])], "dyn_anchors", axes=[0])
    node("Transpose", [node("Concat", strides, "dyn_strides_col", axis=0)], "dyn_strides", perm=[1, 0])
    return nodes, consts
