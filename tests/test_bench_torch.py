"""PyTorch semi-structured sparse check and benchmark: layout helpers on the CPU, the real thing on a GPU."""

from __future__ import annotations

import sys

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

from graphprune.algorithms.masks import nm_violations
from graphprune.algorithms.pattern import NMPattern
from graphprune.errors import GraphpruneError
from graphprune.tensorrt import bench_torch as bt
from tests.onnx_builders import init, make_model, reference_nm_mask, tensor

PATTERN = NMPattern(2, 4)


def test_parse_tokens() -> None:
    assert bt.parse_tokens("512, 4096") == [512, 4096]
    for bad in ["", "a", "0", "-3,4"]:
        with pytest.raises(GraphpruneError, match="`tokens`"):
            bt.parse_tokens(bad)


def test_random_24_is_24_along_k() -> None:
    w = bt.random_24(64, 128)
    assert len(nm_violations(w, PATTERN)) == 0 and np.count_nonzero(w) == w.size // 2


def test_model_cases_take_the_gemm_layout_with_k_last() -> None:
    rng = np.random.default_rng(0)
    mat = rng.standard_normal((128, 64)).astype(np.float32)  # MatMul B: [K, N]
    mat *= reference_nm_mask(mat, 0, 2, 4)
    conv = rng.standard_normal((32, 64, 3, 3)).astype(np.float32)  # [Cout, Cin, kh, kw]: K is Cin
    conv *= reference_nm_mask(conv, 1, 2, 4)
    dense = rng.standard_normal((64, 64)).astype(np.float32)  # not pruned: left out
    nodes = [
        helper.make_node("MatMul", ["x", "w_mat"], ["h"], name="mm"),
        helper.make_node("MatMul", ["h", "w_dense"], ["h2"], name="mm2"),
        helper.make_node("Conv", ["img", "w_conv"], ["c"], name="conv"),
    ]
    model = make_model(
        nodes,
        [tensor("x", shape=[2, 128]), tensor("img", shape=[1, 64, 5, 5])],
        [tensor("h2", shape=[2, 64]), tensor("c", shape=[1, 32, 3, 3])],
        [init(mat, "w_mat"), init(dense, "w_dense"), init(conv, "w_conv")],
    )
    cases = {c.name: c for c in bt.model_cases(ir.from_proto(model), include_head=True)}
    assert set(cases) == {"w_mat", "w_conv"}
    assert (cases["w_mat"].out, cases["w_mat"].k) == (64, 128)
    np.testing.assert_array_equal(cases["w_mat"].weight, mat.T)
    assert (cases["w_conv"].out, cases["w_conv"].k) == (32, 9 * 64)
    assert len(nm_violations(cases["w_conv"].weight, PATTERN)) == 0


def test_markdown_table() -> None:
    rows = [
        bt.GemmTiming(name="w", out=256, k=512, tokens=1024, converts=True, dense_ms=0.02, sparse_ms=0.01),
        bt.GemmTiming(name="v", out=8, k=8, tokens=16, converts=False, dense_ms=0.01, sparse_ms=None, note="x"),
    ]
    text = bt.markdown_table(rows)
    assert "| w | 256 x 512 | 1024 | yes | 0.0200 | 0.0100 | 2.00x |  |" in text
    assert "| v | 8 x 8 | 16 | no (x) |" in text


def test_no_torch_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(GraphpruneError, match="PyTorch is not installed"):
        bt.require_cuda()


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cusparselt", "cutlass"])
def test_gpu_semi_structured_accepts_24_weights_and_times_them(backend: str) -> None:
    if not _cuda():
        pytest.skip("needs PyTorch with a CUDA GPU of compute capability >= 8.0")
    import torch

    if backend == "cutlass" and torch.cuda.get_device_capability()[0] != 8:
        pytest.skip("PyTorch's CUTLASS 2:4 kernels run on compute capability 8.x only (Hopper: cuSPARSELt)")
    cases = [bt.GemmCase("a", 256, 512), bt.GemmCase("b", 512, 1024, bt.random_24(512, 1024, seed=3))]
    results = bt.bench_cases(cases, [256], backend, repeats=5)  # type: ignore[arg-type]
    assert [r.converts for r in results] == [True, True], [r.note for r in results]
    assert all(r.sparse_ms and r.sparse_ms > 0 and r.dense_ms > 0 for r in results)


@pytest.mark.gpu
def test_gpu_sparse_gemm_matches_dense() -> None:
    if not _cuda():
        pytest.skip("needs PyTorch with a CUDA GPU of compute capability >= 8.0")
    import torch
    from torch.sparse import to_sparse_semi_structured

    assert not torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS  # bench_cases restores the switch
    w = torch.from_numpy(bt.random_24(256, 512)).half().cuda()
    x = torch.randn(512, 128, device="cuda", dtype=torch.float16)
    torch.testing.assert_close(torch.mm(to_sparse_semi_structured(w), x), torch.mm(w, x), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_gpu_rejects_a_weight_that_is_not_24() -> None:
    if not _cuda():
        pytest.skip("needs PyTorch with a CUDA GPU of compute capability >= 8.0")
    dense = np.random.default_rng(0).standard_normal((256, 512)).astype(np.float32)
    (result,) = bt.bench_cases([bt.GemmCase("dense", 256, 512, dense)], [128], repeats=2)
    assert not result.converts and result.sparse_ms is None
