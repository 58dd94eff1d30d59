"""A whole LLaMA-7B-shaped decoder block, pruned 2:4 by graphprune, timed in PyTorch: dense vs 2:4, FP16 vs INT8.

NEVER RUN ON A GPU YET: written and CPU-tested where no GPU was lent; the GPU half (``main`` without
``--check-cpu``) has not run anywhere. Run it as one short script on a CUDA GPU of compute capability >= 8.0:

    python benchmarks/gpu_block.py [--json gpu_block.json] [--tokens 4096,16384] [--method magnitude|wanda]
    python benchmarks/gpu_block.py --check-cpu      # the CPU half at a tiny size (no GPU needed)

Steps, each printed with the seconds elapsed (no network access needed; every input is generated here, seeded):

1. build one decoder block of LLaMA-7B shapes (hidden 4096, MLP 11008, 32 heads; a 256-token vocabulary keeps the
   embedding and head negligible) as ONNX, the test suite's decoder (RMSNorm, causal attention without rotary,
   SwiGLU), and prune it with graphprune's own code path (``prune_file``, what ``graphprune apply --nm 2:4``
   runs): magnitude by default, or Wanda on synthetic calibration inputs;
2. read the block back from the written initializers (:func:`graphprune.tensorrt.block_torch.read_block`) and
   check every projection is 2:4 along K;
3. for each token count (batch 1): the float32 reference output on the GPU (TF32 off), then the FP16 dense,
   FP16 2:4, INT8 dense and INT8 2:4 blocks (a variant PyTorch refuses is reported in one line and skipped),
   each output's cosine to the reference, and their times in interleaved rounds (CUDA events, warm-up first);
4. a table (time, speed-up against dense FP16, cosine) and a JSON file (``--json``, default ``gpu_block.json``).

Bounded work: 0.8 GB of FP32 weights (202 M parameters), one forward per variant per round; the whole run is
designed to take under 5 minutes on an H100 (the block build and prune take most of it). ``--check-cpu`` builds a
tiny block the same way and checks the float32 PyTorch forward against ONNX Runtime and the INT8 path's cosine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graphprune.errors import GraphpruneError  # noqa: E402
from graphprune.tensorrt import bench_torch, block_torch  # noqa: E402
from tests.tensorrt_models import DecoderShape, llama_decoder  # noqa: E402

LLAMA_7B_BLOCK = DecoderShape(blocks=1, hidden=4096, heads=32, mlp=11008, vocab=256)
TINY_BLOCKS = DecoderShape(blocks=2, hidden=128, heads=4, mlp=256, vocab=64, seed=1)
STARTED = time.perf_counter()


def say(text: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {text}", flush=True)


def pruned_block(work: Path, shape: DecoderShape, method: str) -> Path:
    """The decoder written to ``work`` and pruned 2:4 by graphprune; the pruned model's path."""
    import onnx

    from graphprune.algorithms.pattern import NMPattern
    from graphprune.algorithms.scores import Method
    from graphprune.calibration.request import CalibrationRequest
    from graphprune.passes.prune import PruneConfig
    from graphprune.pipeline.files import prune_file

    source = work / "block.onnx"
    onnx.save_model(llama_decoder(shape), str(source))
    dims = f"hidden {shape.hidden}, MLP {shape.mlp}, {shape.heads} heads"
    say(f"built {source.name}: {shape.blocks} block(s), {dims}")
    calibration = None
    if method == "wanda":  # synthetic token ids, seeded: the machine has no network and no data set
        ids = np.random.default_rng(0).integers(0, shape.vocab, size=(2, 128), dtype=np.int64)
        calibration = CalibrationRequest(data={"input_ids": ids})
    config = PruneConfig(NMPattern(2, 4), method=Method(method))
    out, _ = prune_file(source, config, work / "block.pruned.onnx", calibration=calibration, force=True)
    say(f"pruned 2:4 ({method}) with graphprune: {out.name}")
    return out


def read_back(path: Path, prefix: str, heads: int) -> block_torch.BlockWeights:
    import onnx_ir as ir

    block = block_torch.read_block(ir.load(str(path)), prefix, heads)
    broken = {name: n for name, n in block.violations().items() if n}
    if broken:
        raise GraphpruneError(f"{path}: projections not 2:4 along K: {broken}")
    say(f"read {prefix} back: {len(block.projections)} projections, every one 2:4 along K")
    return block


def check_cpu(work: Path, method: str) -> bool:
    """The CPU half at a tiny size: the PyTorch float32 block against ONNX Runtime, the INT8 path's cosine."""
    import torch

    block = read_back(pruned_block(work, TINY_BLOCKS, method), "layers.1", TINY_BLOCKS.heads)
    ids = (np.arange(48, dtype=np.int64) * 5 % TINY_BLOCKS.vocab).reshape(1, -1)
    x, expected = block_torch.onnx_block_io(
        str(work / "block.pruned.onnx"), {"input_ids": ids}, "layers.0.mlp_residual", "layers.1.mlp_residual"
    )
    inputs = torch.from_numpy(x[0])
    got = block_torch.build_block(torch, block, "fp32", device="cpu")(inputs).numpy()
    error = float(np.abs(got - expected[0]).max())
    int8 = block_torch.build_block(torch, block, "int8", device="cpu", dtype=torch.float32)(inputs)
    cos = block_torch.cosine(torch, int8, torch.from_numpy(got))
    say(f"PyTorch float32 block vs ONNX Runtime: max abs difference {error:.2e} (tolerance 1e-4)")
    say(f"INT8 (W8A8, CPU integer path) vs float32: cosine {cos:.6f} (at least 0.99)")
    # the GPU run's loop on the CPU: the 2:4 variants are refused here (no cuSPARSELt), the rest compared
    results, refused = block_torch.compare_variants(torch, block, [64], 2, device="cpu", progress=say)
    print(markdown({"rows": [asdict(r) for r in results], "refused": refused}))
    return error < 1e-4 and cos > 0.99 and all(r.cosine > 0.99 for r in results)


def run_gpu(work: Path, tokens: list[int], rounds: int, method: str) -> dict:
    torch = bench_torch.require_cuda()
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference is true float32
    torch.backends.cudnn.allow_tf32 = False
    device = bench_torch.device_description()
    say(device)
    block = read_back(pruned_block(work, LLAMA_7B_BLOCK, method), "layers.0", LLAMA_7B_BLOCK.heads)
    results, refused = block_torch.compare_variants(torch, block, tokens, rounds, progress=say)
    rows = [asdict(r) for r in results]
    cusparselt = getattr(torch.backends, "cusparselt", None)
    version = cusparselt.version() if cusparselt is not None and cusparselt.is_available() else None
    return {
        "device": device,
        "cusparselt": version,
        "method": method,
        "rounds": rounds,
        "rows": rows,
        "refused": refused,
    }


def markdown(result: dict) -> str:
    lines = [
        "| tokens | variant | ms | speed-up vs dense FP16 | cosine to FP32 |",
        "| ---: | --- | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        ratio = f"{r['speedup_vs_fp16']:.2f}x" if r["speedup_vs_fp16"] else "-"
        lines.append(f"| {r['tokens']} | {r['variant']} | {r['ms']:.3f} | {ratio} | {r['cosine']:.6f} |")
    if result["refused"]:
        lines.append("")
    lines += [f"- {variant}: refused ({why})" for variant, why in result["refused"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="4096,16384", help="token counts (batch 1), e.g. 4096,16384")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds per token count")
    parser.add_argument("--method", choices=["magnitude", "wanda"], default="magnitude", help="2:4 pruning method")
    parser.add_argument("--json", type=Path, default=Path("gpu_block.json"), help="where the JSON results go")
    parser.add_argument("--check-cpu", action="store_true", help="run the CPU half at a tiny size and exit")
    args = parser.parse_args(argv)
    try:
        tokens = bench_torch.parse_tokens(args.tokens)
        if args.rounds < 1:
            raise GraphpruneError(f"invalid `rounds` {args.rounds}: need at least 1")
        if not args.check_cpu and not args.json.parent.is_dir():  # before minutes of work, not after
            raise GraphpruneError(f"{args.json}: its folder does not exist")
        with tempfile.TemporaryDirectory(prefix="gpu-block-") as work:
            if args.check_cpu:
                ok = check_cpu(Path(work), args.method)
                print(f"CPU half: {'passes' if ok else 'FAILS'}")
                return 0 if ok else 1
            result = run_gpu(Path(work), tokens, args.rounds, args.method)
    except GraphpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"\n{result['device']}; 2:4 by {result['method']}; median of {result['rounds']} interleaved rounds\n")
    print(markdown(result))
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    say(f"wrote {args.json}; done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
