"""Calibration: statistics collected by in-graph taps equal numpy's on the same activations, fetched separately."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader
from typer.testing import CliRunner

from graphprune.calibration import ActivationStats, CalibrationRequest, calibrate, fingerprint
from graphprune.calibration.synthetic import parse_shape
from graphprune.cli import app
from graphprune.errors import GraphpruneError
from graphprune.graph.targets import Consumer, Target

IR_VERSION = 10
OPSETS = [17, 18]
FLOAT = TensorProto.FLOAT


# ---------------------------------------------------------------- building blocks


def calib(model: object, data: object, targets: list[Target] | None = None, **options: object) -> ActivationStats:
    """calibrate() with the request's options given as keywords."""
    return calibrate(model, CalibrationRequest(data, **options), targets)  # type: ignore[arg-type]


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    inits: list[onnx.TensorProto],
    opset: int,
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "calib", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = IR_VERSION
    return model


def vi(name: str, shape: list | None, elem: int = FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def weight(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)


def target(name: str, shape: tuple[int, ...], k_axis: int, *uses: tuple[str, str, str, int]) -> Target:
    """``uses``: (node, op, activation, activation_axis) per consumer."""
    consumers = tuple(
        Consumer(node=n, op=op, input_index=1, activation=act, activation_axis=axis, output=f"{n}_out")
        for n, op, act, axis in uses
    )
    return Target(
        name=name,
        op=uses[0][1],
        shape=shape,
        dtype="float32",
        k_axis=k_axis,
        out_axis=1 - k_axis if len(shape) == 2 else 0,
        consumers=consumers,
    )


def activations(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], names: list[str]) -> dict:
    """The activation tensors themselves, fetched by an independent ONNX Runtime session (concatenated)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in {o.name for o in m.graph.output})
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    got = [sess.run(names, f) for f in feeds]
    return {n: [g[i] for g in got] for i, n in enumerate(names)}


def numpy_stats(chunks: list[np.ndarray], axis: int) -> tuple[np.ndarray, int, np.ndarray]:
    rows = np.concatenate([np.moveaxis(c.astype(np.float64), axis, -1).reshape(-1, c.shape[axis]) for c in chunks])
    return (rows**2).sum(axis=0), rows.shape[0], rows.T @ rows


def check(model: onnx.ModelProto, targets: list[Target], feeds: list[dict], gram: bool = False) -> ActivationStats:
    stats = calib(model, feeds, targets, gram=gram)
    acts = activations(model, feeds, sorted({c.activation for t in targets for c in t.consumers}))
    for t in targets:
        want_s, want_r, want_g = np.zeros(t.k), 0, np.zeros((t.k, t.k))
        for c in t.consumers:
            s, r, g = numpy_stats(acts[c.activation], c.activation_axis)
            want_s, want_r, want_g = want_s + s, want_r + r, want_g + g
        np.testing.assert_allclose(stats.sumsq[t.name], want_s, rtol=1e-5)
        assert stats.sumsq[t.name].dtype == np.float64
        assert stats.rows[t.name] == want_r
        if gram:
            np.testing.assert_allclose(stats.gram[t.name], want_g, rtol=1e-4, atol=1e-3)
    return stats


def feeds_for(
    rng: np.random.Generator, shapes: dict[str, tuple[int, ...]], n: int = 3
) -> list[dict[str, np.ndarray]]:
    return [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(n)]


def mlp(opset: int, x_shape: list | None = None) -> tuple[onnx.ModelProto, list[Target]]:
    """X[B,S,8] @ W1[8,16] -> Relu -> @ W2[16,4]: MatMul with a 3-D input, K last."""
    rng = np.random.default_rng(0)  # this function's own data, whatever ran before
    x_shape = ["B", "S", 8] if x_shape is None else x_shape
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
    ]
    model = make_model(
        nodes, [vi("x", x_shape)], [vi("y", None)], [weight(rng, "w1", (8, 16)), weight(rng, "w2", (16, 4))], opset
    )
    targets = [
        target("w1", (8, 16), 0, ("mm1", "MatMul", "x", -1)),
        target("w2", (16, 4), 0, ("mm2", "MatMul", "r", -1)),
    ]
    return model, targets


# ---------------------------------------------------------------- statistics vs numpy


@pytest.mark.parametrize("opset", OPSETS)
def test_matmul_3d_input(opset: int) -> None:
    rng = np.random.default_rng(1)  # this function's own data, whatever ran before
    model, targets = mlp(opset)
    check(model, targets, feeds_for(rng, {"x": (2, 5, 8)}), gram=True)


@pytest.mark.parametrize("opset", OPSETS)
def test_matmul_2d_input_and_constant_a(opset: int) -> None:
    """x[B,8] @ W[8,6]; and W2[5,6] @ x2[B,6,7], where the activation's K axis is -2."""
    rng = np.random.default_rng(2)  # this function's own data, whatever ran before
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
        helper.make_node("MatMul", ["w2", "x2"], ["z"], name="mm_const_a"),
    ]
    model = make_model(
        nodes,
        [vi("x", ["B", 8]), vi("x2", ["B", 6, 7])],
        [vi("y", None), vi("z", None)],
        [weight(rng, "w", (8, 6)), weight(rng, "w2", (5, 6))],
        opset,
    )
    targets = [
        target("w", (8, 6), 0, ("mm", "MatMul", "x", -1)),
        target("w2", (5, 6), 1, ("mm_const_a", "MatMul", "x2", -2)),
    ]
    check(model, targets, feeds_for(rng, {"x": (4, 8), "x2": (3, 6, 7)}), gram=True)


@pytest.mark.parametrize("opset", OPSETS)
def test_gemm_trans_a_and_trans_b(opset: int) -> None:
    """Gemm(transA=1): A is [K, M], K on axis 0; Gemm(transB=1): B is [N, K], A is [M, K]."""
    rng = np.random.default_rng(3)  # this function's own data, whatever ran before
    nodes = [
        helper.make_node("Gemm", ["a", "b"], ["y"], name="gemm_ta", transA=1),
        helper.make_node("Gemm", ["c", "d"], ["z"], name="gemm_tb", transB=1),
    ]
    model = make_model(
        nodes,
        [vi("a", [8, 5]), vi("c", [5, 6])],
        [vi("y", None), vi("z", None)],
        [weight(rng, "b", (8, 3)), weight(rng, "d", (4, 6))],
        opset,
    )
    targets = [
        target("b", (8, 3), 0, ("gemm_ta", "Gemm", "a", 0)),
        target("d", (4, 6), 1, ("gemm_tb", "Gemm", "c", 1)),
    ]
    check(model, targets, feeds_for(rng, {"a": (8, 5), "c": (5, 6)}), gram=True)


@pytest.mark.parametrize("opset", OPSETS)
def test_weight_shared_by_two_consumers(opset: int) -> None:
    """y = x @ W and z = relu(x) @ W: one target, statistics summed over its two activations."""
    rng = np.random.default_rng(4)  # this function's own data, whatever ran before
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm_a"),
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w"], ["z"], name="mm_b"),
    ]
    inits = [weight(rng, "w", (8, 4))]
    model = make_model(nodes, [vi("x", ["B", 3, 8])], [vi("y", None), vi("z", None)], inits, opset)
    shared = target("w", (8, 4), 0, ("mm_a", "MatMul", "x", -1), ("mm_b", "MatMul", "r", -1))
    stats = check(model, [shared], feeds_for(rng, {"x": (2, 3, 8)}), gram=True)
    assert stats.rows["w"] == 2 * 3 * 2 * 3


@pytest.mark.parametrize("opset", OPSETS)
def test_conv_nchw(opset: int) -> None:
    rng = np.random.default_rng(5)  # this function's own data, whatever ran before
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    model = make_model(nodes, [vi("x", ["B", 3, 6, 5])], [vi("y", None)], [weight(rng, "w", (4, 3, 3, 3))], opset)
    targets = [target("w", (4, 3, 3, 3), 1, ("conv", "Conv", "x", 1))]
    stats = check(model, targets, feeds_for(rng, {"x": (2, 3, 6, 5)}), gram=True)
    assert stats.rows["w"] == 3 * 2 * 6 * 5


@pytest.mark.parametrize("opset", OPSETS)
def test_unknown_rank_activations(opset: int) -> None:
    """Inputs declared without a shape: the rank-independent taps (Reshape to [-1, K] and friends)."""
    rng = np.random.default_rng(6)  # this function's own data, whatever ran before
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
        helper.make_node("MatMul", ["w2", "x2"], ["z"], name="mm_const_a"),
        helper.make_node("Conv", ["x3", "w3"], ["v"], name="conv"),
    ]
    model = make_model(
        nodes,
        [vi("x", None), vi("x2", None), vi("x3", None)],
        [vi("y", None), vi("z", None), vi("v", None)],
        [weight(rng, "w", (8, 6)), weight(rng, "w2", (5, 6)), weight(rng, "w3", (2, 3, 1, 1))],
        opset,
    )
    targets = [
        target("w", (8, 6), 0, ("mm", "MatMul", "x", -1)),
        target("w2", (5, 6), 1, ("mm_const_a", "MatMul", "x2", -2)),
        target("w3", (2, 3, 1, 1), 1, ("conv", "Conv", "x3", 1)),
    ]
    stats = check(model, targets, feeds_for(rng, {"x": (2, 3, 8), "x2": (2, 6, 7), "x3": (2, 3, 4, 4)}))
    # the gram of a K-not-last, rank-unknown activation is skipped with a warning, the others are collected
    data = feeds_for(rng, {"x": (2, 3, 8), "x2": (2, 6, 7), "x3": (2, 3, 4, 4)})
    with_gram = calib(model, data, targets, gram=True)
    assert set(with_gram.gram) == {"w", "w3"} and any("no Gram" in w for w in with_gram.warnings)
    assert stats.sumsq["w3"].shape == (3,)


@pytest.mark.parametrize("elem", [TensorProto.FLOAT16, TensorProto.BFLOAT16])
def test_half_precision_activations_reduce_in_float32(elem: int) -> None:
    """Large fp16 values whose squares overflow fp16 (300² > 65504) still sum correctly."""
    nodes = [
        helper.make_node("Cast", ["x"], ["xh"], name="to_half", to=elem),
        helper.make_node("Shape", ["xh"], ["s"], name="shape"),  # a consumer that any provider runs in half
    ]
    model = make_model(nodes, [vi("x", ["B", 4])], [vi("s", None, TensorProto.INT64)], [], 18)
    targets = [target("w", (4, 2), 0, ("mm", "MatMul", "xh", -1))]
    x = np.full((3, 4), 300.0, dtype=np.float32)
    stats = calib(model, [{"x": x}], targets)
    np.testing.assert_allclose(stats.sumsq["w"], np.full(4, 3 * 300.0**2), rtol=1e-3)


def test_tap_axes_are_deduplicated_by_activation_and_axis() -> None:
    """Two weights reading one activation (q/k/v style) share one tap; -1 and 2 on a rank-3 tensor are one."""
    rng = np.random.default_rng(7)  # this function's own data, whatever ran before
    from graphprune.calibration.taps import plan_taps

    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"mm{i}") for i in range(3)]
    model = make_model(
        nodes,
        [vi("x", ["B", 3, 8])],
        [vi(f"y{i}", None) for i in range(3)],
        [weight(rng, f"w{i}", (8, 4)) for i in range(3)],
        18,
    )
    targets = [target(f"w{i}", (8, 4), 0, (f"mm{i}", "MatMul", "x", -1 if i else 2)) for i in range(3)]
    with plan_taps(ir.from_proto(model), targets, gram=True) as plan:
        assert len(plan.taps) == 1 and plan.taps[0].targets == ("w0", "w1", "w2")
    stats = calib(model, feeds_for(rng, {"x": (2, 3, 8)}), targets, gram=True)
    assert stats.gram["w0"] is stats.gram["w1"] is stats.gram["w2"]


def test_model_left_unchanged_and_nothing_written_to_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(8)  # this function's own data, whatever ran before
    model, targets = mlp(18)
    before = model.SerializeToString()
    monkeypatch.chdir(tmp_path)
    calib(model, feeds_for(rng, {"x": (2, 5, 8)}), targets)
    assert model.SerializeToString() == before
    assert list(tmp_path.iterdir()) == []


def test_model_path_with_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(9)  # this function's own data, whatever ran before
    model, targets = mlp(17)
    feeds = feeds_for(rng, {"x": (2, 5, 8)})
    expected = calib(model, feeds, targets)
    (tmp_path / "m").mkdir()
    onnx.save_model(
        model,
        str(tmp_path / "m" / "model.onnx"),
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=0,
    )
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    got = calib(tmp_path / "m" / "model.onnx", feeds, targets)
    for t in targets:
        np.testing.assert_array_equal(got.sumsq[t.name], expected.sumsq[t.name])
    assert list(cwd.iterdir()) == []


def test_default_targets_come_from_find_targets() -> None:
    rng = np.random.default_rng(10)  # this function's own data, whatever ran before
    model, targets = mlp(18, x_shape=["B", 8])
    stats = calib(model, feeds_for(rng, {"x": (4, 8)}))
    assert set(stats.sumsq) == {"w1", "w2"}
    assert stats.model_fingerprint == fingerprint(targets)


# ---------------------------------------------------------------- data sources


def _reference(model: onnx.ModelProto, targets: list[Target], x: np.ndarray) -> ActivationStats:
    return calib(model, [{"x": x}], targets)


def _same(a: ActivationStats, b: ActivationStats) -> None:
    assert a.rows == b.rows
    for k in a.sumsq:
        np.testing.assert_allclose(a.sumsq[k], b.sumsq[k], rtol=1e-6)


def test_npz_file_streamed_in_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)  # this function's own data, whatever ran before
    model, targets = mlp(18)
    x = rng.standard_normal((10, 5, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    np.savez_compressed(tmp_path / "calib_z.npz", x=x)
    _same(
        calib(model, tmp_path / "calib.npz", targets, batch_size=4),
        _reference(model, targets, x),
    )
    _same(
        calib(model, str(tmp_path / "calib_z.npz"), targets, batch_size=3),
        _reference(model, targets, x),
    )


def test_npz_directory(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)  # this function's own data, whatever ran before
    model, targets = mlp(17)
    x = rng.standard_normal((6, 5, 8)).astype(np.float32)
    for i in range(3):
        np.savez(tmp_path / f"feed{i}.npz", x=x[2 * i : 2 * i + 2])
    _same(calib(model, tmp_path, targets), _reference(model, targets, x))


def test_iterables_and_calibration_data_reader() -> None:
    rng = np.random.default_rng(13)  # this function's own data, whatever ran before
    model, targets = mlp(18)
    x = rng.standard_normal((6, 5, 8)).astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"x": x[:3]}, {"x": x[3:]}])

        def get_next(self) -> dict | None:
            return next(self.items, None)

    class DuckReader:  # get_next only, as many users write them
        def __init__(self) -> None:
            self.items = [{"x": x[:1]}, {"x": x[1:]}]

        def get_next(self) -> dict | None:
            return self.items.pop(0) if self.items else None

    def generator() -> Iterator[dict[str, np.ndarray]]:
        for i in range(6):
            yield {"x": x[i : i + 1]}

    ref = _reference(model, targets, x)
    for data in [Reader(), DuckReader(), generator(), [{"x": x[:2]}, {"x": x[2:]}], {"x": x}]:
        _same(calib(model, data, targets, batch_size=4), ref)


def embedding_model(opset: int = 18, vocab: int = 50) -> tuple[onnx.ModelProto, list[Target]]:
    """input_ids -> Gather(table[vocab, 8]) -> MatMul W[8, 4]; also takes attention_mask and position_ids."""
    rng = np.random.default_rng(14)  # this function's own data, whatever ran before
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["e"], name="embed"),
        helper.make_node("Cast", ["attention_mask"], ["m"], name="mask_f", to=FLOAT),
        helper.make_node("Unsqueeze", ["m", "ax"], ["m3"], name="unsq"),
        helper.make_node("Mul", ["e", "m3"], ["em"], name="apply_mask"),
        helper.make_node("Cast", ["position_ids"], ["p"], name="pos_f", to=FLOAT),
        helper.make_node("Unsqueeze", ["p", "ax"], ["p3"], name="unsq_p"),
        helper.make_node("Add", ["em", "p3"], ["h"], name="add_pos"),
        helper.make_node("MatMul", ["h", "w"], ["y"], name="mm"),
    ]
    inputs = [vi(n, ["B", "S"], TensorProto.INT64) for n in ("input_ids", "attention_mask", "position_ids")]
    inits = [weight(rng, "table", (vocab, 8)), weight(rng, "w", (8, 4))]
    inits.append(numpy_helper.from_array(np.array([-1]), "ax"))
    model = make_model(nodes, inputs, [vi("y", None)], inits, opset)
    return model, [target("w", (8, 4), 0, ("mm", "MatMul", "h", -1))]


def test_synthetic_data_needs_shapes_and_stays_in_vocab() -> None:
    model, targets = embedding_model(vocab=50)
    with pytest.raises(GraphpruneError, match=r"give its size in `shapes`, e.g. input_ids=1x128"):
        calib(model, None, targets)
    shapes = {n: (2, 16) for n in ("input_ids", "attention_mask", "position_ids")}
    stats = calib(model, None, targets, shapes=shapes, nsamples=8)
    assert stats.rows["w"] == 8 * 16
    assert any("synthesising random inputs" in w for w in stats.warnings)
    from graphprune.calibration.synthetic import embedding_sizes

    assert embedding_sizes(ir.from_proto(model)) == {"input_ids": 50}
    assert parse_shape("input_ids=1x128") == ("input_ids", (1, 128))
    with pytest.raises(GraphpruneError):
        parse_shape("input_ids:1,128")


def test_text_windows_with_a_tokenizer(tmp_path: Path) -> None:
    rng = np.random.default_rng(15)  # this function's own data, whatever ran before
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(40)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)} | {"[UNK]": 40}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "corpus.txt").write_text(" ".join(rng.choice(words, 500)))
    model, targets = embedding_model(vocab=50)
    kwargs = dict(tokenizer=tmp_path / "tokenizer.json", seqlen=16, nsamples=5, batch_size=2)
    a = calib(model, tmp_path / "corpus.txt", targets, seed=1, **kwargs)
    b = calib(model, tmp_path / "corpus.txt", targets, seed=1, **kwargs)
    c = calib(model, tmp_path / "corpus.txt", targets, seed=2, **kwargs)
    assert a.rows["w"] == 5 * 16
    np.testing.assert_array_equal(a.sumsq["w"], b.sumsq["w"])
    assert not np.array_equal(a.sumsq["w"], c.sumsq["w"])
    # the windows, checked against the activations they produce
    from graphprune.calibration.signature import model_inputs
    from graphprune.calibration.text import TextSource

    src = TextSource(
        tmp_path / "corpus.txt",
        tmp_path / "tokenizer.json",
        model_inputs(model),
        seqlen=16,
        nsamples=5,
        seed=1,
        batch_size=2,
    )
    feeds = [f for _, f in src]
    assert [f["input_ids"].shape[0] for f in feeds] == [2, 2, 1]
    assert (feeds[0]["attention_mask"] == 1).all() and (feeds[0]["position_ids"][1] == np.arange(16)).all()
    want, _, _ = numpy_stats(activations(model, feeds, ["h"])["h"], -1)
    np.testing.assert_allclose(a.sumsq["w"], want, rtol=1e-5)


# ---------------------------------------------------------------- errors, warnings, providers


@pytest.mark.parametrize(
    ("feed", "message"),
    [
        ({}, "missing model input"),
        ({"x": np.zeros((2, 5, 8)), "y": np.zeros(1)}, "'y' is not an input of the model"),
        ({"x": np.zeros((2, 5, 8))}, "is float64, the model expects float32"),
        ({"x": np.zeros((2, 8), np.float32)}, "has rank 2"),
        ({"x": np.zeros((2, 5, 7), np.float32)}, "fixes axis 2 to 8"),
    ],
)
def test_bad_inputs_fail_in_one_line_before_any_work(
    feed: dict, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import graphprune.calibration.run as run

    def no_session(*args: object) -> None:
        raise AssertionError("a session was created before the inputs were checked")

    monkeypatch.setattr(run, "Session", no_session)
    model, targets = mlp(18)
    with pytest.raises(GraphpruneError, match=message) as err:
        calib(model, [feed], targets)
    assert "\n" not in str(err.value)


def test_bad_sources(tmp_path: Path) -> None:
    model, targets = mlp(18)
    (tmp_path / "notes.txt").write_text("hello")
    np.savez(tmp_path / "ragged.npz", x=np.zeros((3, 5, 8), np.float32), z=np.zeros((2,)))
    for data, message in [
        (tmp_path / "missing.npz", "not found"),
        (tmp_path / "notes.txt", "`tokenizer`"),
        (tmp_path / "ragged.npz", "differ in length"),
        ([], "empty"),
        (tmp_path / "empty_dir", "no .npz files"),
    ]:
        (tmp_path / "empty_dir").mkdir(exist_ok=True)
        with pytest.raises(GraphpruneError, match=message):
            calib(model, data, targets)


def test_dead_and_nonfinite_channels_are_reported() -> None:
    rng = np.random.default_rng(16)  # this function's own data, whatever ran before
    model, targets = mlp(18)
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    x[..., 3] = 0.0
    x[0, 0, 5] = np.nan
    stats = calib(model, [{"x": x}], targets)
    assert stats.sumsq["w1"][3] == 0 and np.isnan(stats.sumsq["w1"][5])
    assert any("w1: 1 of 8 input channels never saw a non-zero value" in w for w in stats.warnings)
    assert any("w1: 1 of 8 input channels have NaN or Inf" in w for w in stats.warnings)


def test_unavailable_provider_is_a_clear_error() -> None:
    rng = np.random.default_rng(17)  # this function's own data, whatever ran before
    model, targets = mlp(18)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    with pytest.raises(GraphpruneError, match="onnxruntime-gpu"):
        calib(model, feeds_for(rng, {"x": (1, 5, 8)}), targets, provider="cuda")
    with pytest.raises(GraphpruneError, match="not available"):
        calib(model, feeds_for(rng, {"x": (1, 5, 8)}), targets, provider="nonsense")
    stats = calib(model, feeds_for(rng, {"x": (1, 5, 8)}, n=1), targets, provider="CPUExecutionProvider")
    assert stats.rows["w1"] == 5


# ---------------------------------------------------------------- save / load


def test_save_load_round_trip_and_mismatch(tmp_path: Path) -> None:
    rng = np.random.default_rng(18)  # this function's own data, whatever ran before
    model, targets = mlp(18)
    stats = calib(model, feeds_for(rng, {"x": (2, 5, 8)}), targets, gram=True)
    path = stats.save(tmp_path / "stats")
    assert path.name == "stats.npz"
    loaded = ActivationStats.load(path, targets)
    assert loaded.rows == stats.rows and loaded.model_fingerprint == stats.model_fingerprint
    for t in targets:
        np.testing.assert_array_equal(loaded.sumsq[t.name], stats.sumsq[t.name])
        np.testing.assert_array_equal(loaded.gram[t.name], stats.gram[t.name])
    # the fingerprint ignores weight values: a pruned model still matches; a subset of targets does too
    _, pruned_targets = mlp(18)
    assert fingerprint(pruned_targets) == stats.model_fingerprint
    ActivationStats.load(path, targets[:1])
    # but a different K, or a weight that was not calibrated, does not
    wider = [target("w1", (9, 16), 0, ("mm1", "MatMul", "x", -1))]
    with pytest.raises(GraphpruneError, match=r"shape \(9, 16\) \(K=9\)"):
        ActivationStats.load(path, wider)
    with pytest.raises(GraphpruneError, match="no statistics for 1 weight"):
        ActivationStats.load(path, [*targets, target("w3", (4, 4), 0, ("mm3", "MatMul", "y", -1))])
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(GraphpruneError, match="cannot read statistics"):
        ActivationStats.load(tmp_path / "junk.npz")


def test_shared_grams_are_stored_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(19)  # this function's own data, whatever ran before
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"mm{i}") for i in range(2)]
    model = make_model(
        nodes,
        [vi("x", ["B", 8])],
        [vi("y0", None), vi("y1", None)],
        [weight(rng, "w0", (8, 4)), weight(rng, "w1", (8, 4))],
        18,
    )
    targets = [target(f"w{i}", (8, 4), 0, (f"mm{i}", "MatMul", "x", -1)) for i in range(2)]
    stats = calib(model, feeds_for(rng, {"x": (3, 8)}), targets, gram=True)
    path = stats.save(tmp_path / "s.npz")
    with np.load(path) as z:
        assert sorted(k for k in z.files if k.startswith("gram")) == ["gram_0"]
    loaded = ActivationStats.load(path)
    np.testing.assert_array_equal(loaded.gram["w0"], loaded.gram["w1"])


# ---------------------------------------------------------------- command line


def test_cli_calibrate(tmp_path: Path) -> None:
    rng = np.random.default_rng(20)  # this function's own data, whatever ran before
    model, _ = mlp(18, x_shape=["B", 8])
    onnx.save_model(model, str(tmp_path / "model.onnx"))
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((5, 8)).astype(np.float32))
    runner = CliRunner()
    ok = runner.invoke(
        app,
        [
            "calibrate",
            str(tmp_path / "model.onnx"),
            "--calib",
            str(tmp_path / "calib.npz"),
            "-o",
            str(tmp_path / "stats.npz"),
            "--batch-size",
            "2",
            "-q",
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert ActivationStats.load(tmp_path / "stats.npz").rows == {"w1": 5, "w2": 5}
    np.savez(tmp_path / "bad.npz", x=np.zeros((5, 8)))
    bad = runner.invoke(
        app,
        [
            "calibrate",
            str(tmp_path / "model.onnx"),
            "--calib",
            str(tmp_path / "bad.npz"),
            "-o",
            str(tmp_path / "s2.npz"),
            "-q",
        ],
    )
    assert bad.exit_code == 2
    assert "float64, the model expects float32" in bad.output
    assert not (tmp_path / "s2.npz").exists()


def test_in_memory_weights_reach_onnxruntime_without_a_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(21)  # this function's own data, whatever ran before
    import graphprune.calibration.session as session
    from graphprune.calibration.taps import plan_taps, tapped_model

    monkeypatch.setattr(session, "_INLINE_BYTES", 0)  # the test's weights are small
    model, targets = mlp(18)
    graph_model = ir.from_proto(model)
    graph_model.graph.initializers["w1"].const_value = ir.tensor(numpy_helper.to_array(model.graph.initializer[0]))
    with plan_taps(graph_model, targets) as plan:
        tapped = tapped_model(graph_model, plan)
    # w2 feeds only the model's output, downstream of every tap: cut away, never read
    assert set(tapped.injected) == {"w1"} and "mm2" not in {n.name for n in tapped.proto.graph.node}
    assert np.shares_memory(tapped.injected["w1"], graph_model.graph.initializers["w1"].const_value.numpy())
    (stub,) = [t for t in tapped.proto.graph.initializer if t.name in ("w1", "w2")]
    assert stub.name == "w1" and not stub.raw_data and stub.data_location == TensorProto.EXTERNAL
    feeds = feeds_for(rng, {"x": (2, 5, 8)})
    _same(calib(graph_model, feeds, targets), calib(model, feeds, targets))
    assert not graph_model.graph.initializers["w1"].uses()[1:]  # the taps were disconnected again


def test_taps_of_later_activations_come_first_so_onnxruntime_runs_each_tap_early() -> None:
    from graphprune.calibration.taps import plan_taps, tapped_model

    model, targets = mlp(18)
    graph_model = ir.from_proto(model)
    with plan_taps(graph_model, targets) as plan:
        proto = tapped_model(graph_model, plan).proto
    tail = list(proto.graph.node)[3:]
    reads = [next(i for i in n.input if i in {"x", "r"}) for n in tail if {"x", "r"} & set(n.input)]
    assert reads == sorted(reads, key=lambda a: a != "r")  # taps on r (made by node 1) before taps on x
    assert [o.name for o in proto.graph.output] == plan.output_names
    assert [len(v.uses()) for v in graph_model.graph.initializers.values()] == [1, 1]
    assert model.SerializeToString() == ir.to_proto(graph_model).SerializeToString() or len(model.graph.node) == 3


def test_the_tapped_graph_ends_at_the_last_tap_and_computes_nothing_downstream() -> None:
    """Head and output are cut away: a head whose output cannot even be computed does not stop calibration."""
    rng = np.random.default_rng(22)  # this function's own data, whatever ran before
    from graphprune.calibration.taps import plan_taps, tapped_model

    w1, head = weight(rng, "w1", (8, 16)), weight(rng, "head", (16, 4))
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "head"], ["logits"], name="lm_head"),
        # downstream of every tap, and impossible to run (2*5*4 values into rows of 7): must never execute
        helper.make_node("Reshape", ["logits", "bad_shape"], ["y"], name="reshape"),
    ]
    bad_shape = numpy_helper.from_array(np.array([7, -1], dtype=np.int64), "bad_shape")
    model = make_model(nodes, [vi("x", ["B", "S", 8])], [vi("y", None)], [w1, head, bad_shape], 18)
    targets = [
        target("w1", (8, 16), 0, ("mm1", "MatMul", "x", -1)),
        target("head", (16, 4), 0, ("lm_head", "MatMul", "r", -1)),
    ]
    feeds = feeds_for(rng, {"x": (2, 5, 8)})
    with pytest.raises(Exception, match="reshape"):
        activations(model, feeds, ["y"])  # the whole model really fails

    graph_model = ir.from_proto(model)
    with plan_taps(graph_model, targets, gram=True) as plan:
        proto = tapped_model(graph_model, plan).proto
    kept = {n.name for n in proto.graph.node if not n.name.startswith("graphprune_tap")}
    assert kept == {"mm1", "relu"}  # nothing after the last tapped tensor (r)
    assert {i.name for i in proto.graph.initializer} & {"head", "bad_shape"} == set()
    assert [o.name for o in proto.graph.output] == plan.output_names

    stats = calib(model, feeds, targets, gram=True)
    x = [f["x"] for f in feeds]
    r = [np.maximum(c @ numpy_helper.to_array(w1), 0) for c in x]
    for name, chunks in (("w1", x), ("head", r)):
        sumsq, rows, gram = numpy_stats(chunks, -1)
        np.testing.assert_allclose(stats.sumsq[name], sumsq, rtol=1e-5)
        np.testing.assert_allclose(stats.gram[name], gram, rtol=1e-4, atol=1e-3)
        assert stats.rows[name] == rows


def test_a_model_file_is_opened_with_its_inline_weights_left_on_disk(tmp_path: Path) -> None:
    rng = np.random.default_rng(23)  # this function's own data, whatever ran before
    from graphprune.calibration.model_file import open_model

    model, targets = mlp(18)
    big = weight(rng, "w1", (64, 16))  # above the inline threshold: read from the file by reference
    model.graph.initializer[0].CopyFrom(big)
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 64
    targets = [target("w1", (64, 16), 0, ("mm1", "MatMul", "x", -1)), targets[1]]
    onnx.save(model, str(tmp_path / "model.onnx"))
    opened = open_model(tmp_path / "model.onnx")
    tensor = opened.graph.initializers["w1"].const_value
    assert isinstance(tensor, ir.ExternalTensor) and tensor.location == "model.onnx"
    np.testing.assert_array_equal(tensor.numpy(), numpy_helper.to_array(big))
    np.testing.assert_array_equal(
        opened.graph.initializers["w2"].const_value.numpy(), numpy_helper.to_array(model.graph.initializer[1])
    )
    feeds = feeds_for(rng, {"x": (2, 5, 64)})
    _same(calib(tmp_path / "model.onnx", feeds, targets), calib(model, feeds, targets))
    with pytest.raises(GraphpruneError, match="cannot read ONNX model"):
        (tmp_path / "bad.onnx").write_bytes(b"\x0a\xff\xff\xff")
        open_model(tmp_path / "bad.onnx")
