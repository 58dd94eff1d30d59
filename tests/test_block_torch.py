"""A decoder block in PyTorch from graphprune's written weights: against ONNX Runtime and numpy on the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphprune.algorithms.pattern import NMPattern
from graphprune.algorithms.scores import Method
from graphprune.errors import GraphpruneError
from graphprune.passes.prune import PruneConfig
from graphprune.pipeline.files import prune_file
from graphprune.quantize.config import QuantizeConfig
from graphprune.quantize.files import quantize_file
from graphprune.tensorrt import block_torch as bt
from tests.tensorrt_models import DecoderShape, llama_decoder

torch = pytest.importorskip("torch")

SHAPE = DecoderShape(blocks=2, hidden=64, heads=4, mlp=96, vocab=48, seed=3)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny decoder, written by ``apply --nm 2:4`` (magnitude)."""
    work = tmp_path_factory.mktemp("block")
    source = work / "decoder.onnx"
    onnx.save_model(llama_decoder(SHAPE), str(source))
    out, _ = prune_file(source, PruneConfig(NMPattern(2, 4), method=Method.MAGNITUDE), work / "pruned.onnx")
    return out


def _ids(tokens: int) -> np.ndarray:
    return (np.arange(tokens, dtype=np.int64) * 7 % SHAPE.vocab).reshape(1, tokens)


def test_block_reads_the_written_weights_in_out_k_layout(pruned: Path) -> None:
    block = bt.read_block(ir.load(str(pruned)), "layers.1", SHAPE.heads)
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(pruned)).graph.initializer}
    assert set(block.projections) == set(bt.PROJECTIONS) and set(block.norms) == set(bt.NORMS)
    for role in ("q_proj", "down_proj"):
        name = f"layers.1.{'mlp' if role == 'down_proj' else 'self_attn'}.{role}.weight"
        np.testing.assert_array_equal(block.projections[role], stored[name].T)  # MatMul B is [K, out]
    np.testing.assert_array_equal(block.norms["input_layernorm"], stored["layers.1.input_layernorm.w"])
    assert (block.hidden, block.intermediate) == (SHAPE.hidden, SHAPE.mlp)
    assert block.violations() == dict.fromkeys(bt.PROJECTIONS, 0)
    for w in block.projections.values():  # really pruned: half of every group of 4 along K is zero
        assert (np.count_nonzero(w.reshape(w.shape[0], -1, 4), axis=-1) <= 2).all()
        assert np.count_nonzero(w) <= w.size // 2


def test_an_unpruned_block_shows_its_violations() -> None:
    block = bt.read_block(ir.from_proto(llama_decoder(SHAPE)), "layers.0", SHAPE.heads)
    assert all(v > 0 for v in block.violations().values())


def test_float32_forward_equals_onnx_runtime(pruned: Path) -> None:
    block = bt.read_block(ir.load(str(pruned)), "layers.1", SHAPE.heads)
    x, expected = bt.onnx_block_io(
        str(pruned), {"input_ids": _ids(24)}, "layers.0.mlp_residual", "layers.1.mlp_residual"
    )
    forward = bt.build_block(torch, block, "fp32", device="cpu")
    got = forward(torch.from_numpy(x[0])).numpy()
    np.testing.assert_allclose(got, expected[0], atol=1e-4, rtol=1e-4)
    # the causal mask matters: a block without it would see the future tokens and differ
    assert np.abs(expected[0] - x[0]).max() > 1e-2


def _numpy_w8a8(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Symmetric int8 W8A8 in numpy: per-output-channel weight scales, per-token activation scales."""

    def codes(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scale = np.abs(a).max(axis=1, keepdims=True).astype(np.float32) / np.float32(127)
        scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
        return np.clip(np.rint(a / scale), -127, 127).astype(np.int64), scale

    (xq, xs), (wq, ws) = codes(x), codes(w)
    return (xq @ wq.T).astype(np.float32) * xs * ws.T


def test_int8_projection_equals_numpy() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 64)).astype(np.float32)
    w[:, ::4] = w[:, 1::4] = 0  # 2:4 along K
    x = rng.standard_normal((12, 64)).astype(np.float32)
    x[3] = 0  # an all-zero token: scale 1, codes 0, output 0
    linear = bt.Int8Linear(torch, w, "cpu", sparse=False)
    codes = linear.codes.numpy()
    assert codes.dtype == np.int8 and (codes[w == 0] == 0).all() and np.abs(codes).max() == 127
    got = linear(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, _numpy_w8a8(x, w), rtol=1e-6, atol=1e-6)
    assert not got[3].any()


def test_int8_and_fp16_blocks_stay_close_to_float32(pruned: Path) -> None:
    block = bt.read_block(ir.load(str(pruned)), "layers.1", SHAPE.heads)
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((32, SHAPE.hidden)).astype(np.float32))
    reference = bt.build_block(torch, block, "fp32", device="cpu")(x)
    int8 = bt.build_block(torch, block, "int8", device="cpu", dtype=torch.float32)(x)
    assert 0.995 < bt.cosine(torch, int8, reference) < 1 - 1e-9  # quantized: close, not equal
    half = bt.build_block(torch, block, "fp16", device="cpu")(x.half())
    assert half.dtype == torch.float16 and bt.cosine(torch, half, reference) > 0.9999


def test_a_quantized_file_is_read_as_its_dequantized_weights(pruned: Path, tmp_path: Path) -> None:
    out, _ = quantize_file(pruned, QuantizeConfig(precision="int8", dynamic=True), tmp_path / "q.onnx", force=True)
    quantized = bt.read_block(ir.load(str(out)), "layers.1", SHAPE.heads)
    float_block = bt.read_block(ir.load(str(pruned)), "layers.1", SHAPE.heads)
    assert quantized.violations() == dict.fromkeys(bt.PROJECTIONS, 0)
    for role, w in float_block.projections.items():
        q = quantized.projections[role]
        assert (q[w == 0] == 0).all() and not np.array_equal(q, w)
        np.testing.assert_allclose(q, w, atol=np.abs(w).max() / 254 + 1e-7)  # within half a step of the grid


def test_missing_weights_and_bad_variants_are_one_line(pruned: Path) -> None:
    model = ir.load(str(pruned))
    with pytest.raises(GraphpruneError, match="no weight found for q_proj"):
        bt.read_block(model, "layers.7", SHAPE.heads)
    with pytest.raises(GraphpruneError, match="not divisible by 5 heads"):
        bt.read_block(model, "layers.0", 5)
    with pytest.raises(ValueError, match="variant must be one of"):
        bt.build_block(torch, bt.read_block(model, "layers.0", SHAPE.heads), "int4", device="cpu")


def _cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", [v for v in bt.VARIANTS if v != "fp32"])
def test_gpu_variants_match_the_float32_block(pruned: Path, variant: str) -> None:
    if not _cuda():
        pytest.skip("needs PyTorch with a CUDA GPU of compute capability >= 8.0")
    block = bt.read_block(ir.load(str(pruned)), "layers.1", SHAPE.heads)
    x = torch.randn(128, SHAPE.hidden, device="cuda")
    reference = bt.build_block(torch, block, "fp32")(x)
    got = bt.build_block(torch, block, variant)(x.half())
    assert bt.cosine(torch, got, reference) > (0.995 if variant.startswith("int8") else 0.9999)


def test_the_gpu_script_cpu_half_checks_a_wanda_pruned_block(tmp_path: Path) -> None:
    from benchmarks import gpu_block

    assert gpu_block.check_cpu(tmp_path, "wanda")
    block = bt.read_block(ir.load(str(tmp_path / "block.pruned.onnx")), "layers.0", gpu_block.TINY_BLOCKS.heads)
    dense = bt.read_block(ir.from_proto(gpu_block.llama_decoder(gpu_block.TINY_BLOCKS)), "layers.0", 4)
    assert block.violations() == dict.fromkeys(bt.PROJECTIONS, 0)
    # Wanda weighs by the activations: its mask is not magnitude's (the 2 largest |w| of each group of 4)
    kept, largest = block.projections["up_proj"] != 0, np.abs(dense.projections["up_proj"])
    groups = largest.reshape(largest.shape[0], -1, 4)
    top2 = groups >= np.sort(groups, axis=-1)[..., 2:3]
    assert not np.array_equal(kept, top2.reshape(kept.shape))


def test_the_gpu_script_refuses_bad_options_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import gpu_block

    missing = tmp_path / "no" / "results.json"
    for args, message in (
        (["--tokens", "4096,x"], "invalid `tokens`"),
        (["--json", str(missing)], "does not exist"),
    ):
        assert gpu_block.main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
    assert not missing.parent.exists()


def test_compare_variants_on_the_cpu_times_what_runs_and_names_what_is_refused(pruned: Path) -> None:
    block = bt.read_block(ir.load(str(pruned)), "layers.1", SHAPE.heads)
    results, refused = bt.compare_variants(torch, block, [16, 40], rounds=2, device="cpu")
    assert [(r.tokens, r.variant) for r in results] == [(n, v) for n in (16, 40) for v in ("fp16", "int8")]
    assert set(refused) == {"fp16-2:4", "int8-2:4"}  # no cuSPARSELt on the CPU
    assert all(why and "\n" not in why and len(why) <= 200 for why in refused.values())
    for r in results:
        assert r.ms > 0 and 0.995 < r.cosine <= 1 + 1e-12
        assert r.speedup_vs_fp16 is not None and (r.variant != "fp16" or r.speedup_vs_fp16 == 1)


@pytest.mark.gpu
def test_gpu_int8_24_products_equal_the_dense_int8_ones() -> None:
    if not _cuda():
        pytest.skip("needs PyTorch with a CUDA GPU of compute capability >= 8.0")
    rng = np.random.default_rng(4)
    w = rng.standard_normal((128, 256)).astype(np.float32)
    w[:, 1::4] = w[:, 2::4] = 0
    x = torch.from_numpy(rng.standard_normal((64, 256)).astype(np.float32)).cuda().half()
    dense = bt.Int8Linear(torch, w, "cuda", sparse=False)
    try:
        sparse = bt.Int8Linear(torch, w, "cuda", sparse=True)
    except RuntimeError as exc:
        pytest.skip(f"cuSPARSELt refuses int8 here: {exc}")
    torch.testing.assert_close(sparse(x), dense(x), rtol=0, atol=0)  # integer products: exact both ways


@pytest.mark.gpu
def test_gpu_compare_variants_times_every_variant(pruned: Path) -> None:
    if not _cuda():
        pytest.skip("needs PyTorch with a CUDA GPU of compute capability >= 8.0")
    block = bt.read_block(ir.load(str(pruned)), "layers.1", SHAPE.heads)
    results, refused = bt.compare_variants(torch, block, [256], rounds=3)
    timed = {r.variant for r in results}
    assert {"fp16", "fp16-2:4", "int8"} <= timed and timed | set(refused) >= set(bt.VARIANTS[1:])
    assert all(r.ms > 0 and r.cosine > 0.99 for r in results)


@pytest.mark.parametrize(
    ("refuses", "form"),
    [
        (lambda dtype, transposed: False, ("int32", True)),
        (lambda dtype, transposed: dtype == torch.int32, ("float32", True)),
        (lambda dtype, transposed: transposed, ("int32", False)),
    ],
)
def test_int8_24_takes_the_first_output_form_cusparselt_offers(
    monkeypatch: pytest.MonkeyPatch, refuses: object, form: tuple[str, bool]
) -> None:
    """cuSPARSELt's entry points emulated on the CPU (a 2:4 weight times B, as the kernel would compute it), so the
    choice of output form and its transposition are checked against the dense integer path."""
    calls = []

    def sparse_mm(packed, b, out_dtype=None, transpose_result=False):  # type: ignore[no-untyped-def]
        calls.append((out_dtype, transpose_result))
        if refuses(out_dtype, transpose_result):  # type: ignore[operator]
            raise RuntimeError("CUSPARSE_STATUS_NOT_SUPPORTED\nmore detail")
        product = (packed.long() @ b.long()).to(out_dtype)  # (out, tokens)
        return product.t().contiguous() if transpose_result else product

    monkeypatch.setattr(torch, "_cslt_compress", lambda codes: codes.clone(), raising=False)
    monkeypatch.setattr(torch, "_cslt_sparse_mm", sparse_mm, raising=False)
    rng = np.random.default_rng(5)
    w = rng.standard_normal((48, 64)).astype(np.float32)
    w[:, 0::4] = w[:, 3::4] = 0
    x = torch.from_numpy(rng.standard_normal((20, 64)).astype(np.float32))
    sparse = bt.Int8Linear(torch, w, "cpu", sparse=True)
    assert (str(sparse.form[0]).removeprefix("torch."), sparse.form[1]) == form
    torch.testing.assert_close(sparse(x), bt.Int8Linear(torch, w, "cpu", sparse=False)(x), rtol=0, atol=0)
    assert calls[-1] == sparse.form


def test_int8_24_refused_in_every_form_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("CUSPARSE_STATUS_NOT_SUPPORTED\nmore detail")

    monkeypatch.setattr(torch, "_cslt_compress", lambda codes: codes.clone(), raising=False)
    monkeypatch.setattr(torch, "_cslt_sparse_mm", refuse, raising=False)
    w = np.zeros((32, 32), dtype=np.float32)
    with pytest.raises(RuntimeError, match="cuSPARSELt refuses int8 x int8 products") as caught:
        bt.Int8Linear(torch, w, "cpu", sparse=True)
    assert "\n" not in str(caught.value) and str(caught.value).count("NOT_SUPPORTED") == 4
