"""SmoothQuant's fold points: scaling what writes an activation's channels by s and its readers' K rows by 1/s
leaves ONNX Runtime's outputs unchanged, and what is no fold (a norm output the residual also reads, a GELU
between two weights) is not offered."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest
from onnx_ir.passes.common import ShapeInferencePass

from graphprune.graph.coupling import Slot
from graphprune.graph.scale_folds import ScaleFold, find_scale_folds, fold_for, fold_scale
from tests.onnx_builders import init, run

HIDDEN, HEADS, HEAD_DIM, FFN = 16, 2, 8, 24

# A pre-norm LLaMA block: RMSNorm written out (as exporters do), attention with heads, SwiGLU MLP, residuals.
LLAMA = """
<ir_version: 8, opset_import: ["" : 17]>
llama (float[2,5,16] x) => (float[2,5,16] y) {
  sq = Mul(x, x)
  ms = ReduceMean <axes = [-1]> (sq)
  mse = Add(ms, eps)
  rms = Sqrt(mse)
  n = Div(x, rms)
  a = Mul(g1, n)
  q = MatMul(a, wq)
  k = MatMul(a, wk)
  v = MatMul(a, wv)
  q4 = Reshape(q, split)
  qh = Transpose <perm = [0, 2, 1, 3]> (q4)
  k4 = Reshape(k, split)
  kh = Transpose <perm = [0, 2, 3, 1]> (k4)
  v4 = Reshape(v, split)
  vh = Transpose <perm = [0, 2, 1, 3]> (v4)
  s = MatMul(qh, kh)
  p = Softmax <axis = -1> (s)
  c = MatMul(p, vh)
  ct = Transpose <perm = [0, 2, 1, 3]> (c)
  cm = Reshape(ct, merge)
  o = MatMul(cm, wo)
  h = Add(x, o)
  sq2 = Mul(h, h)
  ms2 = ReduceMean <axes = [-1]> (sq2)
  mse2 = Add(ms2, eps)
  rms2 = Sqrt(mse2)
  n2 = Div(h, rms2)
  b = Mul(n2, g2)
  gate = MatMul(b, wg)
  sg = Sigmoid(gate)
  silu = Mul(gate, sg)
  up = MatMul(b, wu)
  m = Mul(silu, up)
  d = MatMul(m, wd)
  y = Add(h, d)
}
"""

# A post-norm BERT layer: the first norm's output feeds both the MLP and the residual; GELU written with Erf.
BERT = """
<ir_version: 8, opset_import: ["" : 17]>
bert (float[2,5,16] x) => (float[2,5,8] y) {
  e = LayerNormalization <axis = -1> (x, ge, be)
  f = MatMul(e, fc1)
  a = Add(f, b1)
  a2 = Div(a, sqrt2)
  erf = Erf(a2)
  e1 = Add(erf, one)
  ae = Mul(a, e1)
  gelu = Mul(ae, half)
  f2 = MatMul(gelu, fc2)
  f2b = Add(b2, f2)
  r = Add(e, f2b)
  z = LayerNormalization <axis = -1> (r, gz, bz)
  y = MatMul(z, head)
}
"""

# fc2(dropout(relu(fc1 x + b1))) as two Gemm(transB): relu is positively homogeneous, so fc1's rows and bias
# take the scale, and fc2's K runs along its axis 1.
RELU_MLP = """
<ir_version: 8, opset_import: ["" : 17]>
mlp (float[4,16] x) => (float[4,8] y) {
  h = Gemm <transB = 1> (x, w1, b1)
  r = Relu(h)
  d = Dropout(r)
  y = Gemm <transB = 1> (d, w2, b2)
}
"""


def _weights(rng: np.random.Generator, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Matrices scaled by 1/sqrt(fan-in) as trained layers are, so outputs stay near 1 and float32 exact."""
    return {
        name: (rng.standard_normal(shape) / np.sqrt(shape[0] if len(shape) == 2 else 1)).astype(np.float32)
        for name, shape in shapes.items()
    }


def llama(rng: np.random.Generator) -> ir.Model:
    w = _weights(
        rng,
        {"g1": (HIDDEN,), "g2": (HIDDEN,), "wq": (HIDDEN, HIDDEN), "wk": (HIDDEN, HIDDEN), "wv": (HIDDEN, HIDDEN)},
    )
    w |= _weights(rng, {"wo": (HIDDEN, HIDDEN), "wg": (HIDDEN, FFN), "wu": (HIDDEN, FFN), "wd": (FFN, HIDDEN)})
    w |= {
        "eps": np.array(1e-5, np.float32),
        "split": np.array([0, 0, HEADS, HEAD_DIM], np.int64),
        "merge": np.array([0, 0, HIDDEN], np.int64),
    }
    return _model(LLAMA, w)


def bert(rng: np.random.Generator) -> ir.Model:
    w = _weights(rng, {"ge": (HIDDEN,), "be": (HIDDEN,), "fc1": (HIDDEN, FFN), "b1": (FFN,), "fc2": (FFN, HIDDEN)})
    w |= _weights(rng, {"b2": (HIDDEN,), "gz": (HIDDEN,), "bz": (HIDDEN,), "head": (HIDDEN, 8)})
    w |= {"sqrt2": np.array(np.sqrt(2), np.float32), "one": np.array(1, np.float32)}
    return _model(BERT, w | {"half": np.array(0.5, np.float32)})


def relu_mlp(rng: np.random.Generator) -> ir.Model:
    return _model(RELU_MLP, _weights(rng, {"w1": (FFN, HIDDEN), "b1": (FFN,), "w2": (8, FFN), "b2": (8,)}))


def _model(text: str, weights: dict[str, np.ndarray]) -> ir.Model:
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend(init(v, k) for k, v in weights.items())
    return ir.from_proto(proto)


def _summary(fold: ScaleFold) -> tuple[str, str, tuple, tuple]:
    scaled = tuple(sorted((str(s.value.name), s.axis) for s in fold.scaled))
    return str(fold.activation.name), fold.kind, scaled, tuple(sorted(str(s.value.name) for s in fold.consumers))


CASES = {
    "llama": (
        llama,
        (2, 5, HIDDEN),
        {
            ("a", "norm", (("g1", 0),), ("wk", "wq", "wv")),
            ("b", "norm", (("g2", 0),), ("wg", "wu")),
            ("m", "weight", (("wu", 1),), ("wd",)),  # up's columns: silu(gate) ⊙ up is linear in up
        },
    ),
    # e feeds the residual too (no fold); gelu is not homogeneous (no fold); the last norm folds, bias included
    "bert": (bert, (2, 5, HIDDEN), {("z", "norm", (("bz", 0), ("gz", 0)), ("head",))}),
    "relu-mlp": (relu_mlp, (4, HIDDEN), {("d", "weight", (("b1", 0), ("w1", 0)), ("w2",))}),
}


def llama_with_shapes(rng: np.random.Generator) -> ir.Model:
    """The LLaMA block with every shape recorded, as an exporter or ONNX shape inference leaves it."""
    model = llama(rng)
    ShapeInferencePass()(model)
    return model


CASES["llama-shapes"] = (  # V's columns into O: through the head reshapes, transposes and P·V
    llama_with_shapes,
    (2, 5, HIDDEN),
    CASES["llama"][2] | {("cm", "weight", (("wv", 1),), ("wo",))},
)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_the_folds_found_leave_the_outputs_unchanged(case: str) -> None:
    build, x_shape, expected = CASES[case]
    rng = np.random.default_rng(7)
    model = build(rng)
    x = rng.standard_normal(x_shape).astype(np.float32)
    (before,) = run(model, {"x": x})
    folds = find_scale_folds(model)
    assert {_summary(f) for f in folds} == expected
    for fold in folds:
        fold_scale(fold, np.exp(rng.standard_normal(fold.channels)).astype(np.float32))
    (after,) = run(model, {"x": x})
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-5)


def test_a_fold_multiplies_the_activation_by_the_scale() -> None:
    """The fold's activation, made a model output, comes out multiplied by s (checked against numpy)."""
    rng = np.random.default_rng(3)
    model = llama(rng)
    fold = next(f for f in find_scale_folds(model) if f.activation.name == "m")
    x = rng.standard_normal((2, 5, HIDDEN)).astype(np.float32)
    scale = np.exp(rng.standard_normal(fold.channels)).astype(np.float32)
    fold_scale(fold, scale)
    proto = ir.to_proto(model)
    proto.graph.output.append(onnx.helper.make_tensor_value_info("m", onnx.TensorProto.FLOAT, None))
    (_, scaled_m) = run(proto, {"x": x})
    original = ir.to_proto(llama(np.random.default_rng(3)))
    original.graph.output.append(onnx.helper.make_tensor_value_info("m", onnx.TensorProto.FLOAT, None))
    (_, m) = run(original, {"x": x})
    np.testing.assert_allclose(scaled_m, m * scale, rtol=1e-4, atol=1e-5)


def test_scaling_the_gate_instead_of_up_changes_the_outputs() -> None:
    """The control: the same scale on gate's columns (inside the SiLU) is no fold, and the test would see it."""
    rng = np.random.default_rng(5)
    model = llama(rng)
    x = rng.standard_normal((2, 5, HIDDEN)).astype(np.float32)
    (before,) = run(model, {"x": x})
    fold = next(f for f in find_scale_folds(model) if f.activation.name == "m")
    gate = model.graph.initializers["wg"]
    wrong = ScaleFold(
        fold.activation, fold.channels, (Slot(gate, 1, "producer", gate.uses()[0].node),), fold.consumers
    )
    fold_scale(wrong, np.exp(rng.standard_normal(fold.channels)).astype(np.float32))
    (after,) = run(model, {"x": x})
    assert not np.allclose(after, before, rtol=1e-3, atol=1e-3)


def test_a_second_reader_a_broadcast_column_or_a_shared_norm_weight_is_no_fold() -> None:
    rng = np.random.default_rng(11)
    model = relu_mlp(rng)
    proto = ir.to_proto(model)
    proto.graph.output.append(onnx.helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, None))
    assert find_scale_folds(ir.from_proto(proto)) == []  # r is a model output: a reader outside the fold

    broadcast = onnx.parser.parse_model(
        RELU_MLP.replace("r = Relu(h)", "c = MatMul(x, col)\n  hc = Add(h, c)\n  r = Relu(hc)")
    )
    weights = _weights(rng, {"w1": (FFN, HIDDEN), "b1": (FFN,), "w2": (8, FFN), "b2": (8,), "col": (HIDDEN, 1)})
    broadcast.graph.initializer.extend(init(v, k) for k, v in weights.items())
    assert find_scale_folds(ir.from_proto(broadcast)) == []  # one column added to every channel cannot take s

    shared = llama(rng)  # g2 also scales the first norm: scaling it for one would scale the other
    first = next(n for n in shared.graph if n.outputs[0].name == "a")
    first.replace_input_with(0, shared.graph.initializers["g2"])
    assert {str(f.activation.name) for f in find_scale_folds(shared)} == {"m"}


def test_a_consumer_weight_finds_its_fold() -> None:
    model = llama(np.random.default_rng(13))
    by_activation = {str(f.activation.name): _summary(f) for f in find_scale_folds(model)}
    for weight, activation in (("wq", "a"), ("wv", "a"), ("wu", "b"), ("wd", "m")):
        fold = fold_for(model, weight)
        assert fold is not None and _summary(fold) == by_activation[activation]
    assert fold_for(model, "wo") is None  # O reads the heads merged by a Reshape: no fold point behind it
    assert fold_for(model, "g1") is None  # a norm weight is no consumer


# Grouped-query attention: one key/value head serves two query heads (repeat_kv: Unsqueeze, Expand, Reshape).
GQA = """
<ir_version: 8, opset_import: ["" : 17]>
gqa (float[2,5,16] x) => (float[2,5,16] y) {
  q = MatMul(x, wq)
  q4 = Reshape(q, qsplit)
  qh = Transpose <perm = [0, 2, 1, 3]> (q4)
  qt = Transpose <perm = [0, 1, 3, 2]> (qh)
  v = MatMul(x, wv)
  v4 = Reshape(v, kvsplit)
  vh = Transpose <perm = [0, 2, 1, 3]> (v4)
  v5 = Unsqueeze(vh, axis2)
  vx = Expand(v5, repeat)
  vr = Reshape(vx, heads)
  s = MatMul(qh, qt)
  p = Softmax <axis = -1> (s)
  c = MatMul(p, vr)
  ct = Transpose <perm = [0, 2, 1, 3]> (c)
  cm = Reshape(ct, merge)
  y = MatMul(cm, wo)
}
"""


def test_a_key_value_head_shared_by_query_heads_is_no_fold() -> None:
    """O's K rows count query heads, V's columns key/value heads: no per-channel scale maps one to the other."""
    rng = np.random.default_rng(17)
    weights = _weights(rng, {"wq": (HIDDEN, HIDDEN), "wv": (HIDDEN, HEAD_DIM), "wo": (HIDDEN, HIDDEN)})
    weights |= {
        "qsplit": np.array([0, 0, HEADS, HEAD_DIM], np.int64),
        "kvsplit": np.array([0, 0, 1, HEAD_DIM], np.int64),
        "axis2": np.array([2], np.int64),
        "repeat": np.array([1, 1, HEADS, 1, 1], np.int64),
        "heads": np.array([0, HEADS, -1, HEAD_DIM], np.int64),
        "merge": np.array([0, 0, HIDDEN], np.int64),
    }
    model = _model(GQA, weights)
    ShapeInferencePass()(model)
    assert model.graph.node(len(model.graph) - 1).inputs[0].shape is not None  # the walk had shapes to read
    assert find_scale_folds(model) == []
