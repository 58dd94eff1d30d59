"""One LLaMA-style decoder block, built in PyTorch from the weights graphprune wrote, dense and 2:4, FP16 and INT8.

The block is read from a model file's initializers (pruned, optionally quantized: DequantizeLinear weights are read
as the values their consumers see), each projection in its canonical ``(out, K)`` layout, and computes what the
decoders graphprune's tests and benchmarks build compute: RMSNorm (``x / sqrt(mean(x²) + eps) · w``), causal
multi-head attention without rotary embeddings (those ONNX blocks have none), the output projection and residual,
RMSNorm, a SwiGLU MLP (``down(silu(gate(h)) · up(h))``) and residual. Activations are ``(tokens, hidden)``.

Variants (:data:`VARIANTS`) differ only in how the seven projections multiply:

* ``fp32``: the reference, float32 dense;
* ``fp16``: dense FP16 (``F.linear``);
* ``fp16-2:4``: FP16 with the weight a ``torch.sparse.to_sparse_semi_structured`` tensor (cuSPARSELt);
* ``int8``: W8A8 with ``torch._int_mm``: weights int8 per output channel on graphprune's symmetric grid
  (:mod:`graphprune.algorithms.quant_grid`: a pruned zero is code 0, so 2:4 survives), activations int8 per token
  with dynamic absmax scales, int32 accumulation, both scales applied in float32 after the product;
* ``int8-2:4``: the same codes, the weight compressed by cuSPARSELt (``torch._cslt_compress``) and multiplied by
  ``torch._cslt_sparse_mm``, int32 out where the library offers it, else float32 (the same epilogue follows).

The unfused epilogue of the int8 variants (quantizing activations, scaling the int32 result) is part of their time.
Norms, attention (``scaled_dot_product_attention``) and the SwiGLU product run in FP16 in every FP16 and INT8
variant. ``torch`` is imported lazily; only the 2:4 variants need a GPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from graphprune.algorithms.layout import to_canonical
from graphprune.algorithms.masks import nm_violations
from graphprune.algorithms.pattern import NMPattern
from graphprune.algorithms.quant_grid import QuantGrid, grid_scales, quantize_codes
from graphprune.errors import GraphpruneError

if TYPE_CHECKING:
    import onnx_ir as ir

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")
VARIANTS = ("fp32", "fp16", "fp16-2:4", "int8", "int8-2:4")
_PATTERN = NMPattern(2, 4)
_INT8 = QuantGrid(precision="int8")

Linear = Callable[[Any], Any]  # (tokens, K) -> (tokens, out)


@dataclass(frozen=True)
class BlockWeights:
    """One decoder block: projections ``(out, K)`` float32 by name (:data:`PROJECTIONS`), RMSNorm weights."""

    projections: Mapping[str, np.ndarray]
    norms: Mapping[str, np.ndarray]
    heads: int
    eps: float = 1e-5

    @property
    def hidden(self) -> int:
        return int(self.projections["q_proj"].shape[1])

    @property
    def intermediate(self) -> int:
        return int(self.projections["gate_proj"].shape[0])

    def violations(self) -> dict[str, int]:
        """2:4 groups along K that break the pattern, per projection (all 0: every weight is 2:4)."""
        return {name: len(nm_violations(w, _PATTERN)) for name, w in self.projections.items()}


def read_block(model: ir.Model, prefix: str, heads: int, eps: float = 1e-5) -> BlockWeights:
    """The block whose weights are named ``{prefix}.…`` (e.g. ``layers.0``), as its consumers see them.

    A projection is the target whose name has its role (``q_proj`` …) as one dot-separated part; a norm weight the
    stored 1-D tensor with ``input_layernorm`` or ``post_attention_layernorm`` as one.
    """
    from graphprune.graph.stored import read_array, stored_tensor, stored_values
    from graphprune.graph.targets import find_targets
    from graphprune.graph.weights import read_weight

    stored = stored_values(model.graph)
    projections: dict[str, np.ndarray] = {}
    for target in find_targets(model, include_head=True).targets:
        role = _role(target.name, prefix, PROJECTIONS)
        if role is None:
            continue
        values = read_weight(stored, target).effective().astype(np.float32, copy=False)
        projections[role] = to_canonical(values, target.k_axis, target.out_axis).reshape(
            values.shape[target.out_axis], -1
        )
    norms: dict[str, np.ndarray] = {}
    for name, value in stored.items():
        role = _role(name, prefix, NORMS)
        if role is not None and len(stored_tensor(value).shape) == 1:
            norms[role] = read_array(stored_tensor(value)).astype(np.float32)
    missing = [r for r in (*PROJECTIONS, *NORMS) if r not in projections and r not in norms]
    if missing:
        raise GraphpruneError(f"block {prefix!r}: no weight found for {', '.join(missing)}")
    block = BlockWeights(projections, norms, heads, eps)
    if block.hidden % heads:
        raise GraphpruneError(f"block {prefix!r}: hidden size {block.hidden} is not divisible by {heads} heads")
    return block


def _role(name: str, prefix: str, roles: Sequence[str]) -> str | None:
    if not name.startswith(prefix + "."):
        return None
    parts = name[len(prefix) + 1 :].split(".")
    return next((r for r in roles if r in parts), None)


# ------------------------------------------------------------------------------------------------ the block


class TorchBlock:
    """The block's forward with one variant's projections; call it on ``(tokens, hidden)`` activations."""

    def __init__(
        self, torch: Any, weights: BlockWeights, linears: Mapping[str, Linear], dtype: Any, device: str
    ) -> None:
        self.torch = torch
        self.heads = weights.heads
        self.eps = weights.eps
        self.linears = dict(linears)
        self.dtype = dtype
        self.norms = {n: torch.from_numpy(w).to(device=device, dtype=dtype) for n, w in weights.norms.items()}

    def __call__(self, x: Any) -> Any:
        lin, f = self.linears, self.torch.nn.functional
        h = self._rms_norm(x, "input_layernorm")
        x = x + lin["o_proj"](self._attention(lin["q_proj"](h), lin["k_proj"](h), lin["v_proj"](h)))
        h = self._rms_norm(x, "post_attention_layernorm")
        return x + lin["down_proj"](f.silu(lin["gate_proj"](h)) * lin["up_proj"](h))

    def _rms_norm(self, x: Any, name: str) -> Any:
        # the mean of squares in float32: in FP16 it overflows past |x| ~ 256
        x32 = x.float()
        normed = x32 * self.torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(self.dtype) * self.norms[name]

    def _attention(self, q: Any, k: Any, v: Any) -> Any:
        tokens, hidden = q.shape
        split = [t.reshape(tokens, self.heads, hidden // self.heads).transpose(0, 1) for t in (q, k, v)]
        context = self.torch.nn.functional.scaled_dot_product_attention(*split, is_causal=True)
        return context.transpose(0, 1).reshape(tokens, hidden)


def build_block(
    torch: Any, weights: BlockWeights, variant: str, device: str = "cuda", dtype: Any = None
) -> TorchBlock:
    """The block in one of :data:`VARIANTS` on ``device``; raises RuntimeError/ValueError where PyTorch refuses.

    ``dtype`` overrides the activations' type of an int8 variant (float32 on the CPU, where the tests compare the
    integer path with numpy without FP16 rounding in between).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant.startswith("fp") or dtype is None:
        dtype = torch.float32 if variant == "fp32" else torch.float16
    makers: dict[str, Callable[[np.ndarray], Linear]] = {
        "fp32": lambda w: _dense_linear(torch, w, torch.float32, device),
        "fp16": lambda w: _dense_linear(torch, w, torch.float16, device),
        "fp16-2:4": lambda w: _sparse_linear(torch, w, device),
        "int8": lambda w: Int8Linear(torch, w, device, sparse=False),
        "int8-2:4": lambda w: Int8Linear(torch, w, device, sparse=True),
    }
    make = makers[variant]
    return TorchBlock(torch, weights, {n: make(w) for n, w in weights.projections.items()}, dtype, device)


def _dense_linear(torch: Any, w: np.ndarray, dtype: Any, device: str) -> Linear:
    weight = torch.from_numpy(np.ascontiguousarray(w)).to(device=device, dtype=dtype)
    return lambda x: torch.nn.functional.linear(x, weight)


def _sparse_linear(torch: Any, w: np.ndarray, device: str) -> Linear:
    from torch.sparse import to_sparse_semi_structured

    dense = torch.from_numpy(np.ascontiguousarray(w)).to(device=device, dtype=torch.float16)
    sparse = to_sparse_semi_structured(dense)
    if not torch.equal(sparse.to_dense(), dense):
        raise ValueError("the semi-structured copy of a weight differs from the weight")
    return lambda x: torch.nn.functional.linear(x, sparse)


def quantize_tokens(torch: Any, x: Any) -> tuple[Any, Any]:
    """Per-token symmetric int8 codes of ``x`` ``(tokens, K)`` and float32 scales ``(tokens, 1)``.

    Round half to even (``torch.round``), saturated to ±127 as graphprune's grid; an all-zero row gets scale 1.
    """
    x32 = x.float()
    scale = x32.abs().amax(dim=-1, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(x32 / scale).clamp_(-127, 127).to(torch.int8), scale


class Int8Linear:
    """W8A8 projection: int8 weight codes per output channel, int8 per-token activations, int32 accumulation."""

    def __init__(self, torch: Any, w: np.ndarray, device: str, sparse: bool) -> None:
        self.torch = torch
        scales = grid_scales(w, _INT8)  # (out, 1)
        self.codes = torch.from_numpy(quantize_codes(w, scales, _INT8)).to(device)  # (out, K), row-major
        self.scales = torch.from_numpy(scales.reshape(1, -1)).to(device)  # (1, out)
        self.sparse = sparse
        if sparse:
            self.packed = torch._cslt_compress(self.codes)
            self.form = self._sparse_form()

    def _sparse_form(self) -> tuple[Any, bool]:
        """The first output form this cuSPARSELt build takes: int32, else float32 (exact to 2**24, then rounded
        at 6e-8 relative), each written transposed ((tokens, out), as PyTorch's own 2:4 linear asks) or not; a
        one-line RuntimeError when it takes none."""
        torch = self.torch
        probe = torch.zeros((32, self.codes.shape[1]), dtype=torch.int8, device=self.codes.device)
        errors = []
        for form in ((torch.int32, True), (torch.float32, True), (torch.int32, False), (torch.float32, False)):
            try:
                self._sparse_product(probe, form)
                return form
            except RuntimeError as exc:
                errors.append(f"{form[0]}{' transposed' if form[1] else ''}: {_first_line(exc, 80)}")
        raise RuntimeError(f"cuSPARSELt refuses int8 x int8 products ({'; '.join(errors)})")

    def _sparse_product(self, codes: Any, form: tuple[Any, bool]) -> Any:
        """(tokens, out) accumulators of ``codes`` (tokens, K) times the compressed weight."""
        # codes row-major is B (K, tokens) column-major: the int8 "TN" layout cuSPARSELt wants
        dtype, transposed = form
        product = self.torch._cslt_sparse_mm(self.packed, codes.t(), out_dtype=dtype, transpose_result=transposed)
        return product.contiguous() if transposed else product.t().contiguous()

    def __call__(self, x: Any) -> Any:
        codes, token_scales = quantize_tokens(self.torch, x)
        codes = codes.contiguous()  # _int_mm and cuSPARSELt's int8 layout want row-major activations
        acc = self._sparse_product(codes, self.form) if self.sparse else self._int_mm(codes)
        return (acc.float() * token_scales * self.scales).to(x.dtype)

    def _int_mm(self, codes: Any) -> Any:
        torch = self.torch
        if codes.is_cuda:
            return torch._int_mm(codes, self.codes.t())  # B column-major: cuBLASLt's int8 layout
        # on the CPU: the same integer product in int64 (exact), so the CPU tests check the maths, not a kernel
        return (codes.long() @ self.codes.t().long()).int()


# ------------------------------------------------------------------------------------------- checks, timing


def onnx_block_io(
    model_path: str, feeds: Mapping[str, np.ndarray], block_input: str, block_output: str
) -> tuple[np.ndarray, np.ndarray]:
    """What ONNX Runtime computes for a block: the values named ``block_input`` and ``block_output`` of one run.

    Both become extra graph outputs of an in-memory copy of the model (the file is not modified).
    """
    import onnx  # lazy: only the checks run ONNX Runtime
    import onnxruntime as ort

    model = onnx.load_model(model_path)
    present = {o.name for o in model.graph.output}
    for name in (block_input, block_output):
        if name not in present:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x, y = session.run([block_input, block_output], dict(feeds))
    return np.asarray(x), np.asarray(y)


def cosine(torch: Any, a: Any, b: Any) -> float:
    """Cosine similarity of two tensors, flattened, computed in float64."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    return float((a64 @ b64) / (a64.norm() * b64.norm()).clamp_min(1e-300))


def time_interleaved(
    torch: Any, calls: Mapping[str, Callable[[], Any]], rounds: int, device: str = "cuda", warmup: int = 2
) -> dict[str, float]:
    """Median milliseconds per call of each function, in interleaved rounds (each round calls every function once).

    On a GPU, between two CUDA events (GPU time; the host waits for each call to end before the next); on the
    CPU, wall time.
    """
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end))
            else:
                began = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - began) * 1e3)
    return {name: float(np.median(t)) for name, t in times.items()}


@dataclass(frozen=True)
class VariantResult:
    """One variant at one token count: median time, speed-up against dense FP16 and cosine to float32."""

    tokens: int
    variant: str
    ms: float
    speedup_vs_fp16: float | None
    cosine: float


def compare_variants(
    torch: Any,
    weights: BlockWeights,
    tokens: Sequence[int],
    rounds: int,
    device: str = "cuda",
    variants: Sequence[str] = VARIANTS[1:],
    progress: Callable[[str], None] = lambda _: None,
) -> tuple[list[VariantResult], dict[str, str]]:
    """Build every variant, then at each token count (batch 1, seeded random activations): each output's cosine
    to the float32 block's, and the times of all variants in interleaved rounds.

    A variant PyTorch refuses (to build, or to run at a token count) is left out; the second result says why, in
    one line per variant.
    """
    reference_block = build_block(torch, weights, "fp32", device)
    built, refused = {}, {}
    for variant in variants:
        try:
            built[variant] = build_block(torch, weights, variant, device)
        except (RuntimeError, ValueError, NotImplementedError, AttributeError) as exc:  # Attribute: no _cslt_*
            refused[variant] = _first_line(exc)
            progress(f"{variant}: refused by PyTorch: {refused[variant]}")
    progress(f"built: {', '.join(built) or 'none'}")
    results = []
    for n in tokens:
        generator = torch.Generator(device=device).manual_seed(n)
        x = torch.randn(n, weights.hidden, device=device, generator=generator)
        half = x.half()
        cosines, calls = {}, {}
        with torch.inference_mode():
            reference = reference_block(x)
            for variant, forward in built.items():
                try:
                    cosines[variant] = cosine(torch, forward(half), reference)
                    calls[variant] = lambda f=forward, h=half: f(h)
                except (RuntimeError, NotImplementedError) as exc:
                    refused[f"{variant} at {n} tokens"] = _first_line(exc)
                    progress(f"{variant} at {n} tokens: refused by PyTorch: {_first_line(exc)}")
            del reference
            progress(f"{n} tokens: timing {len(calls)} variants in {rounds} interleaved rounds")
            times = time_interleaved(torch, calls, rounds, device)
        base = times.get("fp16")
        for variant, ms in times.items():
            results.append(VariantResult(n, variant, ms, base / ms if base else None, cosines[variant]))
            progress(f"{n} tokens, {variant}: {ms:.3f} ms, cosine {cosines[variant]:.6f}")
        del x, half, calls
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return results, refused


def _first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's first line, cut at ``limit`` characters (PyTorch's dispatcher errors run to kilobytes)."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
