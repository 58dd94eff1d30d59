"""Attention cores fused into ONNX Runtime's MultiHeadAttention (``quantize --target ort``).

Two tiny BERT-shaped layers in the forms the exporters write: the legacy (TorchScript) exporter's, with shapes
computed by ``Shape → Gather → Unsqueeze → Concat``, ``Kᵀ`` as ``Transpose(0,2,3,1)``, ``/√d`` after Q·Kᵀ and a
``[B, 1, 1, L]`` mask from ``attention_mask``, no shapes on intermediate values; and the dynamo exporter's, with
``√scale`` on both Q and Kᵀ, ``Kᵀ`` as ``Reshape → Transpose(0,2,1) → Reshape``, a ``Where(mask, 0, min)`` bias
of ``[B, 1, S, L]`` shared by two layers, and the softmax NaN guard. The reference is ONNX Runtime running the
model before the rewrite; the fused kernel sums in another order, so outputs agree within float32 rounding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from typer.testing import CliRunner

from graphprune.calibration.request import CalibrationRequest
from graphprune.cli.app import app
from graphprune.quantize.config import QuantizeConfig
from graphprune.quantize.files import quantize_file
from graphprune.quantize.fuse_attention import fuse_attention
from graphprune.quantize.shape_tokens import shape_tokens
from tests.onnx_builders import SEQ, attention, init, make_model, run, tensor

S, D, H, HD = 6, 8, 2, 4  # tokens, width, heads, head width
FP32_RTOL = 2e-6  # the fused kernel's float32 rounding, relative to the largest output


def _projections(rng: np.random.Generator, prefix: str, x: str) -> tuple[list, list]:
    nodes, inits = [], []
    for t in "qkv":
        w, b = f"{prefix}w{t}", f"{prefix}b{t}"
        inits += [init((rng.standard_normal((D, D)) * 0.5).astype(np.float32), w)]
        inits += [init((rng.standard_normal(D) * 0.1).astype(np.float32), b)]
        nodes += [
            helper.make_node("MatMul", [x, w], [f"{prefix}{t}_mm"], name=f"{prefix}{t}_proj"),
            helper.make_node("Add", [f"{prefix}{t}_mm", b], [f"{prefix}{t}"]),
        ]
    return nodes, inits


def _legacy_split(prefix: str, t: str) -> list:
    """Reshape(t, [Shape(t)[0], Shape(t)[1], H, HD]) with the shape computed, as TorchScript writes it."""
    p = f"{prefix}{t}"
    return [
        helper.make_node("Shape", [p], [f"{p}_shape"]),
        helper.make_node("Gather", [f"{p}_shape", "i0"], [f"{p}_b"], axis=0),
        helper.make_node("Gather", [f"{p}_shape", "i1"], [f"{p}_s"], axis=0),
        helper.make_node("Unsqueeze", [f"{p}_b", "ax0"], [f"{p}_b1"]),
        helper.make_node("Unsqueeze", [f"{p}_s", "ax0"], [f"{p}_s1"]),
        helper.make_node("Concat", [f"{p}_b1", f"{p}_s1", "nh", "hd"], [f"{p}_target"], axis=0),
        helper.make_node("Reshape", [p, f"{p}_target"], [f"{p}4"]),
    ]


def legacy_bert(seed: int = 0, axis: int = -1, scale_last: bool = False) -> onnx.ModelProto:
    """One legacy-exported attention block: y = x + O(softmax(Q·Kᵀ/√d + (1 - mask)·-10000)·V); with
    ``scale_last``, softmax((Q·Kᵀ + mask)/√d) instead, which scales the mask too."""
    rng = np.random.default_rng(seed)
    nodes, inits = _projections(rng, "", "x")
    consts = {
        "i0": np.array(0, np.int64),
        "i1": np.array(1, np.int64),
        "ax0": np.array([0], np.int64),
        "ax12": np.array([1, 2], np.int64),
        "nh": np.array([H], np.int64),
        "hd": np.array([HD], np.int64),
        "width": np.array([D], np.int64),
        "root": np.array(np.sqrt(HD), np.float32),
        "one": np.array(1.0, np.float32),
        "big": np.array(-10000.0, np.float32),
        "wo": (rng.standard_normal((D, D)) * 0.5).astype(np.float32),
    }
    for t in "qkv":
        nodes += _legacy_split("", t)
    nodes += [
        helper.make_node("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3]),
        helper.make_node("Unsqueeze", ["attention_mask", "ax12"], ["m4"]),
        helper.make_node("Cast", ["m4"], ["mf"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "mf"], ["inv"]),
        helper.make_node("Mul", ["inv", "big"], ["bias"]),
        helper.make_node("MatMul", ["qh", "kt"], ["s0"]),
        *(
            [helper.make_node("Add", ["s0", "bias"], ["s1"]), helper.make_node("Div", ["s1", "root"], ["s"])]
            if scale_last
            else [helper.make_node("Div", ["s0", "root"], ["s1"]), helper.make_node("Add", ["s1", "bias"], ["s"])]
        ),
        helper.make_node("Softmax", ["s"], ["p"], axis=axis),
        helper.make_node("MatMul", ["p", "vh"], ["a0"]),
        helper.make_node("Transpose", ["a0"], ["a1"], perm=[0, 2, 1, 3]),
        helper.make_node("Shape", ["a1"], ["a1_shape"]),
        helper.make_node("Gather", ["a1_shape", "i0"], ["a_b"], axis=0),
        helper.make_node("Gather", ["a1_shape", "i1"], ["a_s"], axis=0),
        helper.make_node("Unsqueeze", ["a_b", "ax0"], ["a_b1"]),
        helper.make_node("Unsqueeze", ["a_s", "ax0"], ["a_s1"]),
        helper.make_node("Concat", ["a_b1", "a_s1", "width"], ["a_target"], axis=0),
        helper.make_node("Reshape", ["a1", "a_target"], ["a"]),
        helper.make_node("MatMul", ["a", "wo"], ["o"], name="o_proj"),
        helper.make_node("Add", ["x", "o"], ["y"]),
    ]
    inits += [init(v, k) for k, v in consts.items()]
    inputs = [tensor("x", shape=["b", "s", D]), tensor("attention_mask", TensorProto.INT64, ["b", "s"])]
    return make_model(nodes, inputs, [tensor("y", shape=["b", "s", D])], inits)


def _dynamo_layer(rng: np.random.Generator, n: int, x: str, scaled_values: bool = False) -> tuple:
    """One dynamo-exported layer reading ``x`` and the shared ``bias``; its output is ``l{n}_y``."""
    p = f"l{n}_"
    nodes, inits = _projections(rng, p, x)
    inits += [init((rng.standard_normal((D, D)) * 0.5).astype(np.float32), f"{p}wo")]
    values = []
    for t in "qkv":
        split = f"{p}split_{t}"
        heads = (H, HD)
        nodes += [
            helper.make_node("Concat", ["batch", "seq", "minus1", "hd"], [split], axis=0),
            helper.make_node("Reshape", [f"{p}{t}", split], [f"{p}{t}4"], allowzero=1),
            helper.make_node("Transpose", [f"{p}{t}4"], [f"{p}{t}h"], perm=[0, 2, 1, 3]),
        ]
        values.append(helper.make_tensor_value_info(f"{p}{t}4", TensorProto.FLOAT, ["b", "s", *heads]))
        values.append(helper.make_tensor_value_info(f"{p}{t}h", TensorProto.FLOAT, ["b", heads[0], "s", heads[1]]))
    kh = f"{p}kh"
    nodes += [  # dynamo's Kᵀ: merge (B, N), swap the last two axes, split (B, N) again
        helper.make_node("Shape", [kh], [f"{p}kshape"]),
        helper.make_node("Slice", [f"{p}kshape", "minus1", "int_max"], [f"{p}k_hd"]),
        helper.make_node("Slice", [f"{p}kshape", "minus2", "minus1"], [f"{p}k_len"]),
        helper.make_node("Slice", [f"{p}kshape", "int_min", "minus2"], [f"{p}k_bn"]),
        helper.make_node("Concat", ["minus1", f"{p}k_len", f"{p}k_hd"], [f"{p}merge"], axis=0),
        helper.make_node("Reshape", [kh, f"{p}merge"], [f"{p}k3"]),
        helper.make_node("Transpose", [f"{p}k3"], [f"{p}k3t"], perm=[0, 2, 1]),
        helper.make_node("Concat", [f"{p}k_bn", f"{p}k_hd", f"{p}k_len"], [f"{p}unmerge"], axis=0),
        helper.make_node("Reshape", [f"{p}k3t", f"{p}unmerge"], [f"{p}kt"]),
        helper.make_node("Mul", [f"{p}qh", "root_scale"], [f"{p}qs"]),
        helper.make_node("Mul", [f"{p}kt", "root_scale"], [f"{p}kts"]),
        helper.make_node("MatMul", [f"{p}qs", f"{p}kts"], [f"{p}s0"]),
        helper.make_node("Add", [f"{p}s0", "bias"], [f"{p}s"]),
        helper.make_node("Softmax", [f"{p}s"], [f"{p}p"], axis=-1),
        helper.make_node("IsNaN", [f"{p}p"], [f"{p}nan"]),
        helper.make_node("Where", [f"{p}nan", "zero", f"{p}p"], [f"{p}z"]),
        *([helper.make_node("Mul", [f"{p}vh", "two"], [f"{p}vs"])] if scaled_values else []),
        helper.make_node("MatMul", [f"{p}z", f"{p}vs" if scaled_values else f"{p}vh"], [f"{p}a0"]),
        helper.make_node("Transpose", [f"{p}a0"], [f"{p}a1"], perm=[0, 2, 1, 3]),
        helper.make_node("Concat", ["batch", "seq", "minus1"], [f"{p}merge_out"], axis=0),
        helper.make_node("Reshape", [f"{p}a1", f"{p}merge_out"], [f"{p}a"], allowzero=1),
        helper.make_node("MatMul", [f"{p}a", f"{p}wo"], [f"{p}o"], name=f"{p}o_proj"),
        helper.make_node("Add", [x, f"{p}o"], [f"{p}y"]),
    ]
    return nodes, inits, values


def dynamo_bert(seed: int = 0, scaled_values: bool = False) -> onnx.ModelProto:
    """Two dynamo-exported layers sharing one ``Where(mask, 0, float32 min)`` bias ``[B, 1, S, L]`` (the first
    layer's V times 2 with ``scaled_values``: no attention core the fused kernel computes)."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Shape", ["attention_mask"], ["batch"], start=0, end=1),
        helper.make_node("Shape", ["attention_mask"], ["seq"], start=1, end=2),
        helper.make_node("Unsqueeze", ["attention_mask", "ax12"], ["m4"]),
        helper.make_node("Cast", ["m4"], ["keep"], to=TensorProto.BOOL),
        helper.make_node("Concat", ["batch", "one_i", "seq", "seq"], ["bias_shape"], axis=0),
        helper.make_node("Expand", ["keep", "bias_shape"], ["keep4"]),
        helper.make_node("Where", ["keep4", "zero", "lowest"], ["bias"]),
    ]
    consts = {
        "ax12": np.array([1, 2], np.int64),
        "one_i": np.array([1], np.int64),
        "minus1": np.array([-1], np.int64),
        "minus2": np.array([-2], np.int64),
        "int_max": np.array([np.iinfo(np.int64).max], np.int64),
        "int_min": np.array([np.iinfo(np.int64).min], np.int64),
        "hd": np.array([HD], np.int64),
        "root_scale": np.array(HD**-0.25, np.float32),
        "zero": np.array(0.0, np.float32),
        "lowest": np.array(np.finfo(np.float32).min, np.float32),
    }
    if scaled_values:
        consts["two"] = np.array(2.0, np.float32)
    inits, values, x = [], [], "x"
    for n in range(2):
        layer_nodes, layer_inits, layer_values = _dynamo_layer(rng, n, x, scaled_values and n == 0)
        nodes, inits, values, x = nodes + layer_nodes, inits + layer_inits, values + layer_values, f"l{n}_y"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    inits += [init(v, k) for k, v in consts.items()]
    values += [
        helper.make_tensor_value_info(f"l{n}_{t}", TensorProto.FLOAT, ["b", "s", D])
        for n in range(2)
        for t in "qkv"
    ]
    values += [helper.make_tensor_value_info("bias", TensorProto.FLOAT, ["b", 1, "s", "s"])]
    inputs = [tensor("x", shape=["b", "s", D]), tensor("attention_mask", TensorProto.INT64, ["b", "s"])]
    model = make_model(nodes, inputs, [tensor("y", shape=["b", "s", D])], inits, opset=18)
    model.graph.value_info.extend(values)
    return model


def feeds(rng: np.random.Generator, batch: int = 3, padded: bool = True) -> dict[str, np.ndarray]:
    mask = np.ones((batch, S), np.int64)
    if padded:
        mask[1, 4:] = 0  # a padded sample
        mask[2, :] = 0  # every key masked: the float32-min bias gives uniform rows, -10000 nearly so
    return {"x": rng.standard_normal((batch, S, D)).astype(np.float32), "attention_mask": mask}


def optimised_session(model: onnx.ModelProto | ir.Model) -> ort.InferenceSession:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("build", [legacy_bert, dynamo_bert])
@pytest.mark.parametrize("padded", [True, False])  # False: the bias is all zero, the If runs the flash kernel
def test_fused_model_matches_the_exported_one(build, padded: bool) -> None:  # type: ignore[no-untyped-def]
    before = build()
    model = ir.from_proto(before)
    fused, refused = fuse_attention(model)
    layers = 2 if build is dynamo_bert else 1
    assert len(fused) == layers and refused == []
    ops = [n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph)]
    assert ops.count("MultiHeadAttention") == 2 * layers and "Softmax" not in ops  # both If branches
    assert ops.count("ReduceMax") == 1  # the shared bias is tested once
    assert model.opset_imports["com.microsoft"] == 1
    x = feeds(np.random.default_rng(1850), padded=padded)
    want = run(before, x)[0]
    for got in (run(model, x)[0], optimised_session(model).run(None, x)[0]):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=0, atol=FP32_RTOL * np.abs(want).max())
    assert all(v.uses() for v in model.graph.initializers.values())  # the constants only the core read are gone


def test_fully_masked_rows_keep_the_guards_zero() -> None:
    """An -inf bias masks every key of a sample: the exporter's guard writes zeros for its NaN rows, and the guard
    on the fused output does the same."""
    before = dynamo_bert()
    for t in before.graph.initializer:
        if t.name == "lowest":
            t.CopyFrom(init(np.array(-np.inf, np.float32), "lowest"))
    model = ir.from_proto(before)
    assert len(fuse_attention(model)[0]) == 2
    x = feeds(np.random.default_rng(1851))
    probabilities = run(with_outputs(before, ["l0_p"]), x)[1]
    assert np.isnan(probabilities[2]).all() and not np.isnan(probabilities[:2]).any()
    want, got = run(before, x)[0], run(model, x)[0]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=FP32_RTOL * np.abs(want).max())


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    proto = onnx.ModelProto.FromString(model.SerializeToString())
    proto.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    return proto


@pytest.mark.parametrize(
    ("proto", "reason", "fused_layers"),
    [
        (dynamo_bert(scaled_values=True), "the values are scaled", 1),  # the second layer still matches
        (legacy_bert(axis=2), "softmax over axis 2", 0),
        (legacy_bert(scale_last=True), "scaled after the bias is added", 0),
    ],
)
def test_unmatched_cores_are_refused_and_left_as_they_are(
    proto: onnx.ModelProto, reason: str, fused_layers: int
) -> None:
    model = ir.from_proto(proto)
    nodes_before = [(n.op_type, n.name) for n in model.graph]
    fused, refused = fuse_attention(model)
    assert len(refused) == 1 and reason in refused[0] and len(fused) == fused_layers
    assert sum(n.op_type == "Softmax" for n in model.graph) == 1  # the refused core's, untouched
    if not fused_layers:
        assert [(n.op_type, n.name) for n in model.graph] == nodes_before
    x = feeds(np.random.default_rng(1852))
    want = run(proto, x)[0]
    np.testing.assert_allclose(run(model, x)[0], want, rtol=0, atol=FP32_RTOL * np.abs(want).max())


def test_a_query_split_that_does_not_keep_the_batch_is_refused() -> None:
    proto = legacy_bert()
    for node in proto.graph.node:  # q split to a constant [1, S, H, HD]: not provably the projection's batch
        if node.output[0] == "q_target":
            node.CopyFrom(helper.make_node("Identity", ["fixed_target"], ["q_target"]))
    proto.graph.initializer.append(init(np.array([1, S, H, HD], np.int64), "fixed_target"))
    model = ir.from_proto(proto)
    fused, refused = fuse_attention(model)
    # not a proven split, and its transpose's shape is unknown, so not a [B, N, S, H] tensor of known heads either
    assert fused == [] and len(refused) == 1 and "query" in refused[0]


def test_shape_tokens_read_the_exporters_shape_arithmetic() -> None:
    model = ir.from_proto(dynamo_bert())
    values = {v.name: v for n in model.graph for v in n.outputs}
    assert shape_tokens(values["l0_split_q"]) == ["b", "s", -1, HD]  # the names of attention_mask's dimensions
    assert shape_tokens(values["l0_merge"]) == [-1, "s", HD]  # negative Slice bounds on a known rank
    assert shape_tokens(values["l0_unmerge"]) == ["b", H, HD, "s"]
    legacy = ir.from_proto(legacy_bert())
    q = legacy.graph.inputs[0]
    target = next(n for n in legacy.graph if n.outputs[0].name == "q_target").outputs[0]
    tokens = shape_tokens(target)  # Shape(q)[0], Shape(q)[1]: no shapes needed for indices ≥ 0
    assert tokens is not None and tokens[2:] == [H, HD] and tokens[0] != tokens[1] and q.name == "x"


def quantize(tmp_path: Path, **options: object) -> tuple[Path, dict]:
    src = tmp_path / "model.onnx"
    onnx.save(dynamo_bert(), src)
    calib = feeds(np.random.default_rng(1853), batch=8, padded=False)
    config = QuantizeConfig(precision="int8", **options)  # type: ignore[arg-type]
    out, report = quantize_file(src, config, tmp_path / "q.onnx", CalibrationRequest(data=calib), force=True)
    return out, report.to_dict()


def test_quantized_ort_model_runs_fused_attention_and_integer_projections(tmp_path: Path) -> None:
    out, report = quantize(tmp_path, target="ort")
    assert len(report["ort_rewrites"]["attention_fused"]) == 2 and report["ort_rewrites"]["nan_guards_moved"] == []
    assert len(report["weights"]) == 8  # q, k, v and o of both layers
    optimized = tmp_path / "optimized.onnx"
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(optimized)
    session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(optimized).graph.node]
    assert ops.count("MatMulIntegerToFloat") == 8 and "MatMul" not in ops and "Softmax" not in ops
    x = feeds(np.random.default_rng(1854))
    (tmp_path / "unfused").mkdir()
    unfused, _ = quantize(tmp_path / "unfused", target="ort", fuse_attention=False)
    want, got = run(onnx.load(unfused), x)[0], session.run(None, x)[0]
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()  # same codes and scales, the kernel differs


@pytest.mark.parametrize("options", [{"target": "tensorrt"}, {"target": "ort", "bmm": True}])
def test_no_fusion_for_tensorrt_or_with_quantized_bmms(tmp_path: Path, options: dict) -> None:
    out, report = quantize(tmp_path, **options)
    assert "attention_fused" not in report["ort_rewrites"]
    assert not any(n.domain == "com.microsoft" for n in onnx.load(out).graph.node)


@pytest.mark.parametrize("flag", [None, "--no-fuse-attention"])
def test_cli_fuses_by_default_for_ort(tmp_path: Path, flag: str | None) -> None:
    src = tmp_path / "model.onnx"
    onnx.save(dynamo_bert(), src)
    args = ["quantize", str(src), "--precision", "int8", "--target", "ort", "-o", str(tmp_path / "q.onnx")]
    args += ["--shape", f"x=2x{S}x{D}", "--shape", f"attention_mask=2x{S}"]
    result = CliRunner().invoke(app, [*args, *([flag] if flag else [])])
    assert result.exit_code == 0, result.output
    fused = [n for n in onnx.load(tmp_path / "q.onnx").graph.node if n.op_type == "If"]
    assert len(fused) == (0 if flag else 2)
    assert ("attention cores fused into MultiHeadAttention: 2" in result.output) == (flag is None)


@pytest.mark.parametrize(("heads", "kv_heads"), [(2, 2), (4, 2)])
def test_unmasked_and_grouped_query_attention_fuse(heads: int, kv_heads: int) -> None:
    """No mask: one MultiHeadAttention, no If. K/V repeated for grouped-query attention (Unsqueeze, Expand,
    Reshape): not a head split, so keys and values go in as [B, N, L, H] tensors."""
    proto, _ = attention(heads, kv_heads, head_dim=4)
    model = ir.from_proto(proto)
    fused, refused = fuse_attention(model)
    ops = [n.op_type for n in model.graph]
    assert len(fused) == 1 and refused == [] and "If" not in ops and ops.count("MultiHeadAttention") == 1
    mha = next(n for n in model.graph if n.op_type == "MultiHeadAttention")
    assert [v.shape.rank() for v in mha.inputs[1:3]] == ([3, 3] if heads == kv_heads else [4, 4])  # type: ignore[union-attr]
    x = {"x": np.random.default_rng(1855).standard_normal((2, SEQ, 8)).astype(np.float32)}
    want = run(proto, x)[0]
    for got in (run(model, x)[0], optimised_session(model).run(None, x)[0]):
        np.testing.assert_allclose(got, want, rtol=0, atol=FP32_RTOL * np.abs(want).max())


def rotary_queries(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Queries rotated after the head split, as decoders do (q·cos + rotate_half(q)·sin): no longer a split."""
    half = 2
    cos, sin = (np.random.default_rng(1856).standard_normal((SEQ, 2 * half)).astype(np.float32) for _ in "cs")
    nodes = [
        helper.make_node("Split", ["q_rot_in", "halves"], ["q_a", "q_b"], axis=-1),
        helper.make_node("Neg", ["q_b"], ["q_nb"]),
        helper.make_node("Concat", ["q_nb", "q_a"], ["q_half"], axis=-1),
        helper.make_node("Mul", ["q_rot_in", "cos"], ["q_c"]),
        helper.make_node("Mul", ["q_half", "sin"], ["q_s"]),
        helper.make_node("Add", ["q_c", "q_s"], ["q"]),
    ]
    out = onnx.ModelProto.FromString(proto.SerializeToString())
    for node in out.graph.node:
        if list(node.output) == ["q"]:
            node.output[0] = "q_rot_in"
    position = next(i for i, n in enumerate(out.graph.node) if list(n.output) == ["q_rot_in"]) + 1
    for i, node in enumerate(nodes):
        out.graph.node.insert(position + i, node)
    out.graph.initializer.extend(
        [init(cos, "cos"), init(sin, "sin"), init(np.array([half, half], np.int64), "halves")]
    )
    del out.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(out)


def test_rotated_queries_are_fed_in_heads_and_merged_for_the_kernel() -> None:
    proto = rotary_queries(attention(4, 2, head_dim=4)[0])
    model = ir.from_proto(proto)
    fused, refused = fuse_attention(model)
    assert len(fused) == 1 and refused == []
    assert any(n.op_type == "Transpose" and n.outputs[0].name.endswith("query_bsnh") for n in model.graph)
    x = {"x": np.random.default_rng(1857).standard_normal((2, SEQ, 8)).astype(np.float32)}
    want = run(proto, x)[0]
    np.testing.assert_allclose(run(model, x)[0], want, rtol=0, atol=FP32_RTOL * np.abs(want).max())


def test_fusion_runs_after_quantization_so_sequential_gptq_sees_no_control_flow(tmp_path: Path) -> None:
    """The If the fusion writes would stop ``sequential`` (it refuses control flow) and hide the o-projections'
    inputs from calibration: fused after quantization, the fused and unfused models hold the same weights."""
    out, report = quantize(tmp_path, target="ort", method="gptq", sequential=True)
    assert len(report["ort_rewrites"]["attention_fused"]) == 2 and len(report["weights"]) == 8
    (tmp_path / "unfused").mkdir()
    unfused, _ = quantize(tmp_path / "unfused", target="ort", method="gptq", sequential=True, fuse_attention=False)
    fused_model, plain = ir.load(out), ir.load(unfused)
    for weight in report["weights"]:  # codes and scales: GPTQ's blocks saw the same graph
        for name in (weight["name"], f"{weight['name']}_scale"):
            want_w = plain.graph.initializers[name].const_value.numpy()  # type: ignore[union-attr]
            np.testing.assert_array_equal(fused_model.graph.initializers[name].const_value.numpy(), want_w)  # type: ignore[union-attr]
    x = feeds(np.random.default_rng(1858))
    want = run(onnx.load(unfused), x)[0]
    assert np.abs(run(fused_model, x)[0] - want).max() < 1e-5 * np.abs(want).max()
