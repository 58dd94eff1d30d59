"""Tiny ONNX models built in code for the tests, and ONNX Runtime helpers."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8  # accepted by every ONNX Runtime we support; onnx >= 1.20 would write 14 by default


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto] = (),  # type: ignore[assignment]
    opset: int = 17,
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = IR_VERSION
    return model


def tensor(name: str, elem: int = TensorProto.FLOAT, shape: list | None = None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def init(array: np.ndarray, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


def run(model: onnx.ModelProto | ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    if isinstance(model, ir.Model):
        model = ir.to_proto(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def initializer(model: onnx.ModelProto | ir.Model, name: str) -> np.ndarray:
    if isinstance(model, ir.Model):
        return model.graph.initializers[name].const_value.numpy()  # type: ignore[union-attr]
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def reference_nm_mask(weight: np.ndarray, k_axis: int, keep: int, group: int) -> np.ndarray:
    """Independent N:M magnitude mask: argsort each group of ``group`` along ``k_axis`` (no ties expected)."""
    moved = np.moveaxis(np.abs(weight.astype(np.float64)), k_axis, -1)
    groups = moved.reshape(-1, group)
    order = np.argsort(-groups, axis=1, kind="stable")
    mask = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(mask, order[:, :keep], True, axis=1)
    return np.moveaxis(mask.reshape(moved.shape), -1, k_axis)


def make_ir_model(*args, **kwargs) -> ir.Model:  # type: ignore[no-untyped-def]
    """:func:`make_model` as the onnx-ir model graphprune's passes work on."""
    return ir.from_proto(make_model(*args, **kwargs))


def residual_blocks_model():
    """Two residual blocks h = h + relu(h A) B: levels A1, B1, A2, B2 whose shapes repeat with period 2."""
    rng = np.random.default_rng(2102)  # its own data, whatever ran before
    weights = {}
    nodes = []
    h = "x"
    for block in (1, 2):
        a, b = f"a{block}", f"b{block}"
        weights[a] = rng.standard_normal((8, 16)).astype(np.float32)
        weights[b] = rng.standard_normal((16, 8)).astype(np.float32)
        nodes += [
            helper.make_node("MatMul", [h, a], [f"u{block}"]),
            helper.make_node("Relu", [f"u{block}"], [f"r{block}"]),
            helper.make_node("MatMul", [f"r{block}", b], [f"v{block}"]),
            helper.make_node("Add", [h, f"v{block}"], [f"h{block}"]),
        ]
        h = f"h{block}"
    model = make_model(
        nodes, [tensor("x", shape=["b", 8])], [tensor(h)], [init(w, name) for name, w in weights.items()]
    )
    return model, weights


def linear_model(w_stored_nk: np.ndarray) -> ir.Model:
    """Y = X @ Wᵀ with W stored [N, K] behind a Transpose, as PyTorch exports a Linear."""
    return make_ir_model(
        [
            helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
            helper.make_node("MatMul", ["x", "wt"], ["y"]),
        ],
        [tensor("x", shape=[None, w_stored_nk.shape[1]])],
        [tensor("y")],
        [init(w_stored_nk, "w")],
    )


def layered_model() -> onnx.ModelProto:
    """Two hidden layers and a classifier head; metadata and an extra opset import to preserve."""
    rng = np.random.default_rng(300)  # its own data, whatever ran before
    w1 = rng.standard_normal((16, 32)).astype(np.float32)
    w2 = rng.standard_normal((32, 16)).astype(np.float32)
    head = rng.standard_normal((16, 4)).astype(np.float32)
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["a"]),
            helper.make_node("Relu", ["a"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["b"]),
            helper.make_node("MatMul", ["b", "head"], ["y"]),
        ],
        [tensor("x", shape=[None, 16])],
        [tensor("y")],
        [init(w1, "w1"), init(w2, "w2"), init(head, "head")],
    )
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    helper.set_model_props(model, {"author": "tests"})
    double = helper.make_function(
        "com.example", "Double", ["t"], ["u"], [helper.make_node("Add", ["t", "t"], ["u"])],
        [helper.make_opsetid("", 17)],
    )  # fmt: skip
    model.functions.append(double)  # a local function, to be kept as it is
    return model


def normed_mlp(
    first: list[onnx.NodeProto], params: list[onnx.TensorProto], weights: dict[str, np.ndarray]
) -> onnx.ModelProto:
    """x -> ``first`` (a norm writing ``n``) -> gate/up -> SiLU(gate) * up -> down -> + x: a LLaMA MLP whose
    three weights (``Wg``, ``Wu`` [D, H], ``Wd`` [H, D]) read two activations a per-channel scale folds into."""
    d, hidden = weights["Wg"].shape
    nodes = [
        *first,
        helper.make_node("MatMul", ["n", "Wg"], ["gate"], name="gate"),
        helper.make_node("MatMul", ["n", "Wu"], ["up"], name="up"),
        helper.make_node("Sigmoid", ["gate"], ["sg"]),
        helper.make_node("Mul", ["gate", "sg"], ["silu"]),
        helper.make_node("Mul", ["silu", "up"], ["h"]),
        helper.make_node("MatMul", ["h", "Wd"], ["down"], name="down"),
        helper.make_node("Add", ["x", "down"], ["y"]),
    ]
    inits = params + [init(np.ascontiguousarray(w), name) for name, w in weights.items()]
    model = make_model(nodes, [tensor("x", shape=["b", 4, d])], [tensor("y", shape=["b", 4, d])], inits)
    model.graph.value_info.append(tensor("up", shape=["b", 4, hidden]))
    model.graph.value_info.append(tensor("silu", shape=["b", 4, hidden]))
    return model


@dataclass
class Net:
    """A tiny model, the names of its weights, and a numpy forward pass given (possibly sliced) weights."""

    model: onnx.ModelProto
    weights: dict[str, np.ndarray]
    feed: dict[str, np.ndarray]
    forward: object  # (weights dict) -> output array
    # per group kind: weight name -> axis that carries the group's channels
    channel_axes: dict[str, int] = field(default_factory=dict)


def draw(rng: np.random.Generator, *shape: int, scale: float = 0.5) -> np.ndarray:
    """Normal float32 values of ``shape``, scaled: weights (and, with ``scale=1``, inputs) for the tiny nets."""
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def gelu_erf(x: np.ndarray) -> np.ndarray:
    from math import erf, sqrt

    return (0.5 * x * (1.0 + np.vectorize(erf)(x / sqrt(2.0)))).astype(np.float32)


def llama_mlp(d: int = 8, hidden: int = 12, seed: int = 0) -> Net:
    """x + down(silu(x @ gate) * (x @ up)), with Sigmoid·x spelled out as the exporter does."""
    rng = np.random.default_rng(seed)
    w = {"gate": draw(rng, d, hidden), "up": draw(rng, d, hidden), "down": draw(rng, hidden, d)}
    nodes = [
        helper.make_node("MatMul", ["x", "gate"], ["g"], name="gate_proj"),
        helper.make_node("Sigmoid", ["g"], ["sg"]),
        helper.make_node("Mul", ["g", "sg"], ["silu"]),
        helper.make_node("MatMul", ["x", "up"], ["u"], name="up_proj"),
        helper.make_node("Mul", ["silu", "u"], ["h"]),
        helper.make_node("MatMul", ["h", "down"], ["m"], name="down_proj"),
        helper.make_node("Add", ["x", "m"], ["y"]),
    ]
    model = make_model(
        nodes,
        [tensor("x", shape=["b", "s", d])],
        [tensor("y", shape=["b", "s", d])],
        [init(v, k) for k, v in w.items()],
    )

    def forward(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
        return x + (silu(x @ p["gate"]) * (x @ p["up"])) @ p["down"]

    return Net(model, w, {"x": draw(rng, 2, 5, d, scale=1.0)}, forward, {"gate": 1, "up": 1, "down": 0})


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Gemma's RMSNorm: x / sqrt(mean(x²) + eps) · (1 + w), the (1 + w) already folded into ``weight``."""
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * weight


def _rms_norm_nodes(x: str, weight: str, out: str) -> list[onnx.NodeProto]:
    """RMSNorm as torch's dynamo exporter writes Gemma's: Pow, ReduceMean, Add eps, Sqrt, Reciprocal, two Muls."""
    return [
        helper.make_node("Pow", [x, "two"], [f"{out}_sq"]),
        helper.make_node("ReduceMean", [f"{out}_sq"], [f"{out}_ms"], axes=[-1], keepdims=1),
        helper.make_node("Add", [f"{out}_ms", "eps"], [f"{out}_mse"]),
        helper.make_node("Sqrt", [f"{out}_mse"], [f"{out}_rms"]),
        helper.make_node("Reciprocal", [f"{out}_rms"], [f"{out}_inv"]),
        helper.make_node("Mul", [x, f"{out}_inv"], [f"{out}_n"]),
        helper.make_node("Mul", [f"{out}_n", weight], [out]),
    ]


def gemma_mlp(d: int = 8, hidden: int = 12, seed: int = 3) -> Net:
    """A Gemma 3 MLP block as torch exports it: x + post_norm(down(gelu_tanh(n @ gate) * (n @ up))) with
    n = pre_norm(x); GELU's tanh form spelled out (Pow 3, Mul, Add, Mul √(2/π), Tanh, Add 1, Mul 0.5, Mul),
    RMSNorm weights (1 + w)."""
    rng = np.random.default_rng(seed)
    w = {"gate": draw(rng, d, hidden), "up": draw(rng, d, hidden), "down": draw(rng, hidden, d)}
    norms = {"pre_w": 1.0 + draw(rng, d, scale=0.1), "post_w": 1.0 + draw(rng, d, scale=0.1)}
    consts = {"two": 2.0, "eps": 1e-6, "three": 3.0, "c": 0.044715, "k": float(np.sqrt(2.0 / np.pi)), "one": 1.0}
    consts["half"] = 0.5
    scalars = [init(np.array(v, np.float32), k) for k, v in consts.items()]
    nodes = [
        *_rms_norm_nodes("x", "pre_w", "n"),
        helper.make_node("MatMul", ["n", "gate"], ["g"], name="gate_proj"),
        helper.make_node("Pow", ["g", "three"], ["g3"]),
        helper.make_node("Mul", ["c", "g3"], ["cg3"]),
        helper.make_node("Add", ["g", "cg3"], ["inner"]),
        helper.make_node("Mul", ["k", "inner"], ["kinner"]),
        helper.make_node("Tanh", ["kinner"], ["t"]),
        helper.make_node("Add", ["t", "one"], ["t1"]),
        helper.make_node("Mul", ["half", "t1"], ["ht1"]),
        helper.make_node("Mul", ["g", "ht1"], ["gelu"]),
        helper.make_node("MatMul", ["n", "up"], ["u"], name="up_proj"),
        helper.make_node("Mul", ["gelu", "u"], ["h"]),
        helper.make_node("MatMul", ["h", "down"], ["m"], name="down_proj"),
        *_rms_norm_nodes("m", "post_w", "pm"),
        helper.make_node("Add", ["x", "pm"], ["y"]),
    ]
    inits = [init(v, k) for k, v in {**w, **norms}.items()] + scalars
    model = make_model(nodes, [tensor("x", shape=["b", "s", d])], [tensor("y", shape=["b", "s", d])], inits)

    def forward(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
        n = rms_norm(x, norms["pre_w"])
        return x + rms_norm((gelu_tanh(n @ p["gate"]) * (n @ p["up"])) @ p["down"], norms["post_w"])

    return Net(model, w, {"x": draw(rng, 2, 5, d, scale=1.0)}, forward, {"gate": 1, "up": 1, "down": 0})


def bert_mlp(d: int = 8, hidden: int = 16, layout: str = "matmul", seed: int = 1) -> Net:
    """x -> w1 (+ b1) -> GELU (its Erf expansion) -> w2 + b2, in one of three spellings:

    * ``matmul``: MatMul then Add(·, b1), GELU's scalars as initializers, x ``[b, d]``;
    * ``gemm``: one Gemm(x, w1, b1, transB=1), w1 stored ``[hidden, d]`` as PyTorch's Linear;
    * ``exported``: as torch exports BERT: MatMul then Add(b1, ·), the scalars Constant nodes, x ``[b, s, d]``.
    """
    rng = np.random.default_rng(seed)
    w1 = draw(rng, hidden, d) if layout == "gemm" else draw(rng, d, hidden)
    w = {"w1": w1, "b1": draw(rng, hidden), "w2": draw(rng, hidden, d), "b2": draw(rng, d)}
    consts = {"half": np.float32(0.5), "one": np.float32(1.0), "sqrt2": np.float32(np.sqrt(2.0))}
    scalars = [init(np.array(v), k) for k, v in consts.items()]
    if layout == "gemm":
        head = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1)]
    elif layout == "exported":
        head = [helper.make_node("Constant", [], [c.name], value=c) for c in scalars]
        head += [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("Add", ["b1", "a"], ["h"])]
        scalars = []
    else:
        head = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("Add", ["a", "b1"], ["h"])]
    nodes = [
        *head,
        helper.make_node("Div", ["h", "sqrt2"], ["hs"]),
        helper.make_node("Erf", ["hs"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["e1"]),
        helper.make_node("Mul", ["h", "e1"], ["he"]),
        helper.make_node("Mul", ["he", "half"], ["g"]),
        helper.make_node("MatMul", ["g", "w2"], ["o"], name="output_dense"),
        helper.make_node("Add", ["o", "b2"], ["y"]),
    ]
    shape = ["b", "s", d] if layout == "exported" else ["b", d]
    inits = [init(v, k) for k, v in w.items()] + scalars
    model = make_model(nodes, [tensor("x", shape=shape)], [tensor("y", shape=shape)], inits)

    def forward(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
        first = p["w1"].T if layout == "gemm" else p["w1"]
        return gelu_erf(x @ first + p["b1"]) @ p["w2"] + p["b2"]

    feed = draw(rng, 2, 3, d, scale=1.0) if layout == "exported" else draw(rng, 6, d, scale=1.0)
    return Net(model, w, {"x": feed}, forward, {"w1": 0 if layout == "gemm" else 1, "b1": 0, "w2": 0})


def gemm_mlp(d: int = 6, hidden: int = 10) -> Net:
    """Gemm(transB=1) → Relu → Gemm(transB=1), PyTorch's Linear layout."""
    rng = np.random.default_rng(2)  # this function's own data, whatever ran before
    w = {"w1": draw(rng, hidden, d), "b1": draw(rng, hidden), "w2": draw(rng, d, hidden), "b2": draw(rng, d)}
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1),
    ]
    model = make_model(
        nodes, [tensor("x", shape=[4, d])], [tensor("y", shape=[4, d])], [init(v, k) for k, v in w.items()]
    )

    def forward(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
        return np.maximum(x @ p["w1"].T + p["b1"], 0) @ p["w2"].T + p["b2"]

    return Net(model, w, {"x": draw(rng, 4, d, scale=1.0)}, forward, {"w1": 0, "b1": 0, "w2": 1})


def residual_stack(
    d: int = 8, hidden: int = 12, small: int = 1, post_norm: bool = False, tokens: bool = False
) -> tuple[onnx.ModelProto, dict, object]:
    """Three residual MLP blocks x + relu(x W1) W2 (then LayerNorm when ``post_norm``, as BERT), output 2·x.

    Block ``small``'s branch is nearly zero. With ``tokens`` x is ``[b, s, d]``, beside an int64
    ``attention_mask [b, s]`` that no node reads (the moments' taps do).
    """
    rng = np.random.default_rng(8)
    nodes, inits, weights = [], [init(np.array(2.0, np.float32), "two")], []
    if post_norm:
        inits += [init(np.ones(d, np.float32), "gamma"), init(np.zeros(d, np.float32), "beta")]
    x = "x"
    for i in range(3):
        w1, w2 = draw(rng, d, hidden), draw(rng, hidden, d) * (0.05 if i == small else 1.0)
        weights.append((w1, w2))
        inits += [init(w1, f"w1_{i}"), init(w2, f"w2_{i}")]
        added = f"a{i}" if post_norm else f"x{i + 1}"
        nodes += [
            helper.make_node("MatMul", [x, f"w1_{i}"], [f"h{i}"]),
            helper.make_node("Relu", [f"h{i}"], [f"r{i}"]),
            helper.make_node("MatMul", [f"r{i}", f"w2_{i}"], [f"m{i}"]),
            helper.make_node("Add", [x, f"m{i}"], [added]),
        ]
        if post_norm:
            nodes.append(
                helper.make_node("LayerNormalization", [added, "gamma", "beta"], [f"x{i + 1}"], epsilon=1e-5)
            )
        x = f"x{i + 1}"
    nodes.append(helper.make_node("Mul", [x, "two"], ["y"]))
    dims: list[str | int] = ["b", "s", d] if tokens else ["b", d]
    inputs = [tensor("x", shape=dims)]
    inputs += [tensor("attention_mask", TensorProto.INT64, ["b", "s"])] if tokens else []
    model = make_model(nodes, inputs, [tensor("y", shape=dims)], inits)

    def forward(x: np.ndarray, skip: set[int]) -> np.ndarray:
        for i, (w1, w2) in enumerate(weights):
            if i not in skip:
                x = x + np.maximum(x @ w1, 0) @ w2
                if post_norm:
                    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
        return 2 * x

    return model, weights, forward  # type: ignore[return-value]


SEQ = 5  # tokens per sequence of the attention block (its GQA Reshape fixes it)


def attention(
    heads: int, kv_heads: int, head_dim: int, d: int = 8, seed: int = 100
) -> tuple[onnx.ModelProto, dict]:
    """x + O(softmax(Q Kᵀ / √hd) V): Q/K/V reshaped by constant shapes; GQA repeats K/V by Unsqueeze+Expand."""
    rng = np.random.default_rng(seed)
    rep = heads // kv_heads
    w = {
        "wq": draw(rng, d, heads * head_dim),
        "bq": draw(rng, heads * head_dim),
        "wk": draw(rng, d, kv_heads * head_dim),
        "wv": draw(rng, d, kv_heads * head_dim),
        "wo": draw(rng, heads * head_dim, d),
    }
    consts = {
        "q_shape": np.array([0, 0, heads, head_dim], np.int64),
        "kv_shape": np.array([0, 0, kv_heads, head_dim], np.int64),
        "merge": np.array([0, 0, heads * head_dim], np.int64),
        "scale": np.array(1 / np.sqrt(head_dim), np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q0"], name="q_proj"),
        helper.make_node("Add", ["q0", "bq"], ["q1"]),
        helper.make_node("Reshape", ["q1", "q_shape"], ["q2"]),
        helper.make_node("Transpose", ["q2"], ["q"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["x", "wk"], ["k0"], name="k_proj"),
        helper.make_node("Reshape", ["k0", "kv_shape"], ["k1"]),
        helper.make_node("Transpose", ["k1"], ["k2"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["x", "wv"], ["v0"], name="v_proj"),
        helper.make_node("Reshape", ["v0", "kv_shape"], ["v1"]),
        helper.make_node("Transpose", ["v1"], ["v2"], perm=[0, 2, 1, 3]),
    ]
    if rep > 1:
        consts["unsq"] = np.array([2], np.int64)
        consts["expand"] = np.array([1, 1, rep, 1, 1], np.int64)
        consts["repeat"] = np.array([0, heads, SEQ, head_dim], np.int64)
        for t in ("k", "v"):
            nodes += [
                helper.make_node("Unsqueeze", [f"{t}2", "unsq"], [f"{t}3"]),
                helper.make_node("Expand", [f"{t}3", "expand"], [f"{t}4"]),
                helper.make_node("Reshape", [f"{t}4", "repeat"], [f"{t}5"]),
            ]
        k, v = "k5", "v5"
    else:
        k, v = "k2", "v2"
    nodes += [
        helper.make_node("Transpose", [k], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["s0"]),
        helper.make_node("Mul", ["s0", "scale"], ["s"]),
        helper.make_node("Softmax", ["s"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", v], ["a0"]),
        helper.make_node("Transpose", ["a0"], ["a1"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["a1", "merge"], ["a"]),
        helper.make_node("MatMul", ["a", "wo"], ["o"], name="o_proj"),
        helper.make_node("Add", ["x", "o"], ["y"]),
    ]
    inits = [init(v, k) for k, v in w.items()] + [init(v, k) for k, v in consts.items()]
    model = make_model(nodes, [tensor("x", shape=["b", SEQ, d])], [tensor("y", shape=["b", SEQ, d])], inits)
    return onnx.shape_inference.infer_shapes(model), w


def attention_np(w: dict, x: np.ndarray, heads: int, kv_heads: int, head_dim: int) -> np.ndarray:
    b, s, _ = x.shape
    q = (x @ w["wq"] + w["bq"]).reshape(b, s, heads, head_dim).transpose(0, 2, 1, 3)
    k = (x @ w["wk"]).reshape(b, s, kv_heads, head_dim).transpose(0, 2, 1, 3)
    v = (x @ w["wv"]).reshape(b, s, kv_heads, head_dim).transpose(0, 2, 1, 3)
    k, v = (np.repeat(t, heads // kv_heads, axis=1) for t in (k, v))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(head_dim)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    a = (p @ v).transpose(0, 2, 1, 3).reshape(b, s, heads * head_dim)
    return x + a @ w["wo"]
