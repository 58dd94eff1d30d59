"""A tiny MobileNetV3-style block as PaddlePaddle's exporter writes it, and its numpy forward: shared by the
structured-pruning tests of several modules."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from tests.onnx_builders import draw, init, make_model, tensor

CIN, C, R, COUT, HW = 3, 6, 3, 4, 4


def mobilenet_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(300)  # this function's own data, whatever ran before
    return {
        "c1": draw(rng, C, CIN, 3, 3),
        "scale": 1 + draw(rng, C, scale=0.1),
        "shift": draw(rng, C),
        "mean": draw(rng, C),
        "var": np.abs(draw(rng, C)) + 0.5,
        "dw": draw(rng, C, 1, 3, 3),
        "dwb": draw(rng, C),
        "se1": draw(rng, R, C, 1, 1),
        "se1b": draw(rng, R),
        "se2": draw(rng, C, R, 1, 1),
        "se2b": draw(rng, C),
        "c2": draw(rng, COUT, C, 1, 1),
    }


def mobilenet_block(w: dict[str, np.ndarray], constant_nodes: bool = True) -> onnx.ModelProto:
    """Conv → BN → HardSwish (x·Clip(x+3, 0, 6)/6) → depthwise Conv(+bias) → Relu → squeeze-excitation
    (GlobalAveragePool → 1x1 Conv + bias → Relu → 1x1 Conv + bias → HardSigmoid → Mul) → Resize (2x) → MaxPool 2
    → 1x1 Conv. SE biases are ``Reshape(b, [1, C, 1, 1])``; weights are Constant nodes when ``constant_nodes``."""
    scalars = {"three": 3.0, "zero": 0.0, "six": 6.0}
    consts = {k: np.array(v, np.float32) for k, v in scalars.items()}
    consts |= {
        "se1b_shape": np.array([1, R, 1, 1], np.int64),
        "se2b_shape": np.array([1, C, 1, 1], np.int64),
        "scales": np.array([1, 1, 2, 2], np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "c1"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["a", "scale", "shift", "mean", "var"], ["n"], epsilon=1e-5),
        helper.make_node("Add", ["n", "three"], ["n3"]),
        helper.make_node("Clip", ["n3", "zero", "six"], ["nc"]),
        helper.make_node("Mul", ["n", "nc"], ["nm"]),
        helper.make_node("Div", ["nm", "six"], ["hs"]),
        helper.make_node("Conv", ["hs", "dw", "dwb"], ["d"], pads=[1, 1, 1, 1], group=C),
        helper.make_node("Relu", ["d"], ["dr"]),
        helper.make_node("GlobalAveragePool", ["dr"], ["p"]),
        helper.make_node("Conv", ["p", "se1"], ["s1"]),
        helper.make_node("Reshape", ["se1b", "se1b_shape"], ["se1b_r"]),
        helper.make_node("Add", ["s1", "se1b_r"], ["s1b"]),
        helper.make_node("Relu", ["s1b"], ["s1r"]),
        helper.make_node("Conv", ["s1r", "se2"], ["s2"]),
        helper.make_node("Reshape", ["se2b", "se2b_shape"], ["se2b_r"]),
        helper.make_node("Add", ["s2", "se2b_r"], ["s2b"]),
        helper.make_node("HardSigmoid", ["s2b"], ["gate"], alpha=0.2, beta=0.5),
        helper.make_node("Mul", ["dr", "gate"], ["e"]),
        helper.make_node("Resize", ["e", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("MaxPool", ["up"], ["mp"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["mp", "c2"], ["y"]),
    ]
    tensors = {**w, **consts}
    if constant_nodes:
        inits = []
        nodes = [
            helper.make_node("Constant", [], [k], value=onnx.numpy_helper.from_array(v, k))
            for k, v in tensors.items()
        ] + nodes
    else:
        inits = [init(v, k) for k, v in tensors.items()]
    return make_model(
        nodes, [tensor("x", shape=["n", CIN, HW, HW])], [tensor("y", shape=["n", COUT, HW, HW])], inits, opset=13
    )


def _conv3(x: np.ndarray, w: np.ndarray, groups: int = 1) -> np.ndarray:
    """3x3 convolution, stride 1, padding 1, NCHW; ``groups`` = channels for a depthwise one."""
    n, _, h, wd = x.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], h, wd))
    for i in range(3):
        for j in range(3):
            patch = xp[:, :, i : i + h, j : j + wd]
            if groups == 1:
                out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
            else:
                out += patch * w[None, :, 0, i, j, None, None]
    return out


def block_np(w: dict[str, np.ndarray], x: np.ndarray, last: bool = True) -> np.ndarray:
    """The block's output, or (``last=False``) the input of its final 1x1 Conv."""

    def per_channel(v: np.ndarray) -> np.ndarray:
        return v.reshape(1, -1, 1, 1)

    a = _conv3(x, w["c1"])
    n = (a - per_channel(w["mean"])) * per_channel(w["scale"] / np.sqrt(w["var"] + 1e-5)) + per_channel(w["shift"])
    hs = n * np.clip(n + 3, 0, 6) / 6
    dr = np.maximum(_conv3(hs, w["dw"], groups=C) + per_channel(w["dwb"]), 0)
    p = dr.mean(axis=(2, 3))
    s1 = np.maximum(p @ w["se1"][:, :, 0, 0].T + w["se1b"], 0)
    gate = np.clip(0.2 * (s1 @ w["se2"][:, :, 0, 0].T + w["se2b"]) + 0.5, 0, 1)
    e = dr * gate[:, :, None, None]
    up = e.repeat(2, axis=2).repeat(2, axis=3)
    mp = up.reshape(up.shape[0], up.shape[1], HW, 2, HW, 2).max(axis=(3, 5))
    if not last:
        return mp
    return np.einsum("nchw,oc->nohw", mp, w["c2"][:, :, 0, 0]).astype(np.float32)
