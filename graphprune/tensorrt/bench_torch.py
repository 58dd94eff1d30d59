"""2:4 on a GPU without TensorRT: PyTorch's semi-structured sparse tensors (cuSPARSELt / CUTLASS).

For each pruned weight, in its canonical ``(out, K)`` layout as FP16 (a Conv's kernel positions join K as in the
im2col GEMM), this module

* checks that ``torch.sparse.to_sparse_semi_structured`` accepts it and gives back exactly the same values: the
  weight has the layout sparse tensor cores take (2:4 along the last dimension, K);
* times the dense FP16 GEMM ``W @ X`` against the 2:4 sparse one with ``X`` of shape ``(K, tokens)`` at the
  model's token counts (batch x sequence), in one run, and reports dense/sparse time ratios (> 1: sparse is
  faster).

``torch`` is imported lazily; everything that needs a GPU raises a one-line GraphpruneError without one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from graphprune.algorithms.layout import to_canonical
from graphprune.algorithms.masks import nm_violations
from graphprune.algorithms.pattern import NMPattern
from graphprune.errors import GraphpruneError

if TYPE_CHECKING:
    import onnx_ir as ir

    from graphprune.graph.targets import Target

Backend = Literal["cusparselt", "cutlass"]
_PATTERN = NMPattern(2, 4)


@dataclass(frozen=True)
class GemmCase:
    """One weight to benchmark: its canonical (out, K) FP32/FP16 values, or only its shape (random 2:4 values)."""

    name: str
    out: int
    k: int
    weight: np.ndarray | None = None


@dataclass(frozen=True, kw_only=True)
class GemmTiming:
    """Dense vs 2:4 sparse FP16 GEMM for one weight at one token count."""

    name: str
    out: int
    k: int
    tokens: int
    converts: bool  # to_sparse_semi_structured accepted the weight and round-trips it exactly
    dense_ms: float
    sparse_ms: float | None
    note: str = ""  # why the weight did not convert or the sparse GEMM did not run
    timing: str = ""  # "cuda graph" (GPU time per call) or "eager" (includes host overhead)

    @property
    def speedup(self) -> float | None:
        """dense time / sparse time: above 1, the 2:4 GEMM is faster."""
        return None if not self.sparse_ms else self.dense_ms / self.sparse_ms


def parse_tokens(text: str) -> list[int]:
    """``"512,4096"`` -> ``[512, 4096]`` (token counts = batch x sequence length)."""
    try:
        values = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise GraphpruneError(
            f"invalid `tokens` {text!r}: expected comma-separated integers, e.g. 512,4096"
        ) from None
    if not values or any(v <= 0 for v in values):
        raise GraphpruneError(f"invalid `tokens` {text!r}: need positive token counts, e.g. 512,4096")
    return values


def gemm_weight(target: Target, values: np.ndarray) -> np.ndarray:
    """A target's weight as the ``(out, R*K)`` GEMM operand, K innermost so 2:4 groups stay along K."""
    canonical = to_canonical(np.asarray(values, dtype=np.float32), target.k_axis, target.out_axis)
    return canonical.reshape(canonical.shape[0], -1)


def model_cases(model: ir.Model, include_head: bool = False) -> list[GemmCase]:
    """One case per target of ``model`` that is 2:4 along K (others are not what this benchmark is about)."""
    # ONNX only here: the GEMM benchmark itself needs no onnx
    from graphprune.graph.stored import stored_values
    from graphprune.graph.targets import find_targets
    from graphprune.graph.weights import read_weight

    stored = stored_values(model.graph)
    cases = []
    for target in find_targets(model, include_head=include_head).targets:
        if target.k % 4:
            continue
        weight = gemm_weight(target, read_weight(stored, target).effective())
        if len(nm_violations(weight, _PATTERN)) == 0:
            cases.append(GemmCase(target.name, weight.shape[0], weight.shape[1], weight))
    return cases


def random_24(out: int, k: int, seed: int = 0) -> np.ndarray:
    """A random ``(out, k)`` weight with the 2 largest magnitudes of every 4 along K kept."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out, k)).astype(np.float32)
    groups = np.abs(w).reshape(-1, 4)
    keep = np.argsort(-groups, axis=1, kind="stable")[:, :2]
    mask = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(mask, keep, True, axis=1)
    return w * mask.reshape(out, k)


def require_cuda() -> Any:
    """``torch`` with a CUDA GPU that has sparse tensor cores, or a one-line error."""
    try:
        import torch  # lazy: graphprune's core never needs PyTorch
    except ImportError:
        raise GraphpruneError(
            "PyTorch is not installed: `pip install torch` (a CUDA build) for `backend=torch`"
        ) from None
    if not torch.cuda.is_available():
        raise GraphpruneError("PyTorch sees no CUDA GPU: the semi-structured sparse benchmark needs one")
    capability = torch.cuda.get_device_capability()
    if capability < (8, 0):
        name = torch.cuda.get_device_name()
        raise GraphpruneError(
            f"{name} has compute capability {capability[0]}.{capability[1]}: 2:4 sparse tensor cores need 8.0+"
        )
    return torch


def bench_cases(
    cases: Iterable[GemmCase],
    tokens: Sequence[int],
    backend: Backend = "cusparselt",
    repeats: int = 50,
) -> list[GemmTiming]:
    """Check and time every case at every token count, in one process and one run."""
    torch = require_cuda()
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    previous = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"  # a class-wide switch: restored below
    try:
        return [t for case in cases for t in _bench_case(torch, to_sparse_semi_structured, case, tokens, repeats)]
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = previous


def _bench_case(
    torch: Any, to_sparse: Callable[[Any], Any], case: GemmCase, tokens: Sequence[int], repeats: int
) -> list[GemmTiming]:
    """Check one weight and time it at every token count."""
    results = []
    values = case.weight if case.weight is not None else random_24(case.out, case.k)
    dense = torch.from_numpy(np.ascontiguousarray(values)).to(device="cuda", dtype=torch.float16)
    try:
        sparse = to_sparse(dense)
        converts = bool(torch.equal(sparse.to_dense(), dense))
        note = "" if converts else "semi-structured copy differs from the weight"
    except (RuntimeError, ValueError) as exc:
        sparse, converts, note = None, False, str(exc).strip().splitlines()[0]
    for n in tokens:
        x = torch.randn(case.k, n, device="cuda", dtype=torch.float16)
        dense_ms, dense_how = _time(torch, partial(torch.mm, dense, x), repeats)
        sparse_ms, sparse_how, error = None, "", ""
        if sparse is not None and converts:
            try:
                sparse_ms, sparse_how = _time(torch, partial(torch.mm, sparse, x), repeats)
            except RuntimeError as exc:  # shapes or layouts the sparse kernels refuse
                error = str(exc).strip().splitlines()[0]
        how = dense_how if sparse_how in ("", dense_how) else f"dense {dense_how}, sparse {sparse_how}"
        results.append(
            GemmTiming(
                name=case.name,
                out=case.out,
                k=case.k,
                tokens=n,
                converts=converts,
                dense_ms=dense_ms,
                sparse_ms=sparse_ms,
                note=note or error,
                timing=how,
            )
        )
    return results


def _time(torch: Any, fn: Callable[[], Any], repeats: int, inner: int = 20) -> tuple[float, str]:
    """Median milliseconds per call of ``fn`` and how it was timed.

    ``inner`` back-to-back calls are captured in a CUDA graph and replayed between two CUDA events, so the
    figure is GPU time without Python and library launch overhead (what an inference engine sees). Where the
    op cannot be captured, the same calls run eagerly back to back ("eager": includes host overhead that the
    GPU waits for).
    """
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    method = "cuda graph"
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(inner):
                fn()
        run: Callable[[], Any] = graph.replay
    except RuntimeError:
        torch.cuda.synchronize()
        method = "eager"

        def run() -> None:
            for _ in range(inner):
                fn()

    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return float(np.median(times)), method


def device_description() -> str:
    """GPU name, compute capability and torch version, for the benchmark table's caption."""
    torch = require_cuda()
    major, minor = torch.cuda.get_device_capability()
    return (
        f"{torch.cuda.get_device_name()} (sm_{major}{minor}), torch {torch.__version__}, CUDA {torch.version.cuda}"
    )


def markdown_table(results: Sequence[GemmTiming]) -> str:
    """Results as a Markdown table."""
    lines = [
        "| weight | out x K | tokens | semi-structured | dense ms | 2:4 ms | dense/sparse | timing |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        sparse = f"{r.sparse_ms:.4f}" if r.sparse_ms else f"- ({r.note})" if r.converts and r.note else "-"
        ratio = f"{r.speedup:.2f}x" if r.speedup else "-"
        ok = "yes" if r.converts else f"no ({r.note})"
        cells = [r.name, f"{r.out} x {r.k}", str(r.tokens), ok, f"{r.dense_ms:.4f}", sparse, ratio, r.timing]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
