"""A small SmolLM2-like decoder made in code, for the TensorRT build tests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.onnx_builders import IR_VERSION


@dataclass(frozen=True)
class DecoderShape:
    """LLaMA-style dimensions, small enough to build in about a second, wide enough (256) to be sparse-eligible."""

    blocks: int = 2
    hidden: int = 256
    heads: int = 4
    mlp: int = 512
    vocab: int = 256
    seed: int = 0


def llama_decoder(shape: DecoderShape = DecoderShape()) -> onnx.ModelProto:
    """A decoder like SmolLM2's (RMSNorm, causal multi-head attention without rotary, SwiGLU MLP, LM head).

    ``input_ids`` is ``[batch, sequence]`` (both dynamic), ``logits`` ``[batch, sequence, vocab]``; every
    projection is a MatMul with a ``[K, N]`` FP32 initializer, as PyTorch's exporter writes ``nn.Linear``.
    """
    rng = np.random.default_rng(shape.seed)
    d, head_dim = shape.hidden, shape.hidden // shape.heads
    nodes: list[onnx.NodeProto] = []
    inits = [
        numpy_helper.from_array(np.array([-1], np.int64), "axes_last"),
        numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
        numpy_helper.from_array(np.array(1.0 / np.sqrt(head_dim), np.float32), "scale"),
        numpy_helper.from_array(np.array(-1e4, np.float32), "masked"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array([0, 0, shape.heads, head_dim], np.int64), "heads_shape"),
        numpy_helper.from_array(np.array([0, 0, d], np.int64), "hidden_shape"),
        numpy_helper.from_array(np.array(0, np.int64), "i0"),
        numpy_helper.from_array(np.array(1, np.int64), "i1"),
        numpy_helper.from_array(np.array([0], np.int64), "ax0"),
        numpy_helper.from_array(np.array([1], np.int64), "ax1"),
        numpy_helper.from_array((rng.standard_normal((shape.vocab, d)) * 0.02).astype(np.float32), "embed"),
    ]

    def node(op: str, inputs: list[str], output: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=f"/{output}/{op}", **attrs))
        return output

    def linear(x: str, name: str, k: int, n: int) -> str:
        weight = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"{name}.weight"))
        return node("MatMul", [x, f"{name}.weight"], name)

    def rms_norm(x: str, name: str) -> str:
        inits.append(numpy_helper.from_array((1 + 0.05 * rng.standard_normal(d)).astype(np.float32), f"{name}.w"))
        mean = node("ReduceMean", [node("Mul", [x, x], f"{name}.sq"), "axes_last"], f"{name}.mean", keepdims=1)
        rms = node("Sqrt", [node("Add", [mean, "eps"], f"{name}.var")], f"{name}.rms")
        return node("Mul", [node("Div", [x, rms], f"{name}.normed"), f"{name}.w"], name)

    # Causal mask [S, S]: position j > i is masked.
    seq = node("Gather", [node("Shape", ["input_ids"], "ids_shape"), "i1"], "seq_len", axis=0)
    positions = node("Range", ["i0", seq, "i1"], "positions")
    future = node(
        "Greater",
        [node("Unsqueeze", [positions, "ax0"], "pos_row"), node("Unsqueeze", [positions, "ax1"], "pos_col")],
        "future",
    )
    mask = node("Where", [future, "masked", "zero"], "causal_mask")

    x = node("Gather", ["embed", "input_ids"], "embed_tokens", axis=0)
    for i in range(shape.blocks):
        p = f"layers.{i}"
        h = rms_norm(x, f"{p}.input_layernorm")
        heads = []
        for proj, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
            y = node(
                "Reshape", [linear(h, f"{p}.self_attn.{proj}_proj", d, d), "heads_shape"], f"{p}.{proj}_heads"
            )
            heads.append(node("Transpose", [y], f"{p}.{proj}_t", perm=perm))
        scores = node("Mul", [node("MatMul", heads[:2], f"{p}.scores"), "scale"], f"{p}.scaled")
        probs = node("Softmax", [node("Add", [scores, mask], f"{p}.masked")], f"{p}.probs", axis=-1)
        context = node(
            "Transpose", [node("MatMul", [probs, heads[2]], f"{p}.ctx")], f"{p}.ctx_t", perm=[0, 2, 1, 3]
        )
        context = node("Reshape", [context, "hidden_shape"], f"{p}.ctx_flat")
        x = node("Add", [x, linear(context, f"{p}.self_attn.o_proj", d, d)], f"{p}.attn_residual")
        h = rms_norm(x, f"{p}.post_attention_layernorm")
        gate = linear(h, f"{p}.mlp.gate_proj", d, shape.mlp)
        silu = node("Mul", [gate, node("Sigmoid", [gate], f"{p}.mlp.sigmoid")], f"{p}.mlp.silu")
        hidden = node("Mul", [silu, linear(h, f"{p}.mlp.up_proj", d, shape.mlp)], f"{p}.mlp.hidden")
        x = node("Add", [x, linear(hidden, f"{p}.mlp.down_proj", shape.mlp, d)], f"{p}.mlp_residual")
    linear(rms_norm(x, "norm"), "logits", d, shape.vocab)

    graph = helper.make_graph(
        nodes,
        "smollm2_like",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", shape.vocab])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="graphprune-tests")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model
