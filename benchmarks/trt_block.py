"""Dense against 2:4 engines of one decoder block with LLaMA-7B shapes (hidden 4096, MLP 11008, 32 heads), one run.

The block is the test suite's SmolLM2-like decoder (``tests/tensorrt_models.py``) at LLaMA-7B widths, one block
and a 256-token vocabulary so the embedding and head stay negligible. It goes the user's way: ``graphprune apply
--nm 2:4`` (magnitude) and ``graphprune convert --fp16`` for the sparse model, ``convert --fp16`` alone for the
dense one; then ``graphprune build`` for both (``--no-sparse`` for the dense one) with the chosen backend, and,
where a GPU is present, both engines are timed at the OPT shape (default 1 x 2048 tokens) and the dense/sparse
latency ratio is printed.

Without a GPU only the builds run (TensorRT-RTX builds ahead of time): build time, engine size and what the builder
said about sparsity are printed. If the runtime refuses to load an engine on the GPU (TensorRT-RTX's support matrix
lists RTX GPUs and compute capability 8.0, not Hopper), its exact message is printed; time the same shapes with
PyTorch's semi-structured kernels instead: ``python benchmarks/torch_sparse_gemm.py``.

    python benchmarks/trt_block.py [--backend tensorrt-rtx] [--tokens 2048] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graphprune.errors import GraphpruneError  # noqa: E402
from graphprune.tensorrt.build import has_cuda_gpu  # noqa: E402
from tests.tensorrt_models import DecoderShape, llama_decoder  # noqa: E402

LLAMA_7B_BLOCK = DecoderShape(blocks=1, hidden=4096, heads=32, mlp=11008, vocab=256)


def graphprune(*args: object) -> float:
    """Run the CLI as a user would; seconds taken."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "graphprune", *map(str, args)], check=True, cwd=ROOT)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="tensorrt-rtx", choices=["tensorrt", "tensorrt-rtx"])
    parser.add_argument("--tokens", type=int, default=2048, help="sequence length at OPT (batch 1)")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="trt-block-"))
    work.mkdir(parents=True, exist_ok=True)
    source = work / "block.onnx"
    if not source.exists():
        onnx.save_model(llama_decoder(LLAMA_7B_BLOCK), str(source))
    graphprune(
        "apply", source, "--nm", "2:4", "--method", "magnitude", "-o", work / "block.pruned.onnx", "--force"
    )
    graphprune("convert", work / "block.pruned.onnx", "--fp16", "-o", work / "sparse.onnx", "--force")
    graphprune("convert", source, "--fp16", "-o", work / "dense.onnx", "--force")
    shapes = f"input_ids:1x1,1x{args.tokens},1x{args.tokens}"
    results = {}
    for name, flag in (("dense", "--no-sparse"), ("sparse", "--sparse")):
        engine = work / f"{name}.engine"
        wall = graphprune(
            "build",
            work / f"{name}.onnx",
            "-o",
            engine,
            "--backend",
            args.backend,
            flag,
            "--shapes",
            shapes,
            "--force",
        )
        report = json.loads(engine.with_name(engine.name + ".json").read_text())
        results[name] = report
        print(
            f"{name}: {report['product']} {report['version']}, build {report['build_seconds']:.1f} s "
            f"(command {wall:.1f} s), engine {report['engine_bytes'] / 2**20:.1f} MiB; "
            f"sparsity: {report['sparsity']['verdict']}"
        )
    if not has_cuda_gpu():
        print("no GPU: engines built, not timed")
        return 0
    from graphprune.tensorrt.run import time_engine

    timings = {}
    for name in results:
        try:
            timings[name] = time_engine(work / f"{name}.engine", [shapes], args.iterations, backend=args.backend)
        except GraphpruneError as exc:
            print(f"{name}: the runtime refused the engine on this GPU: {exc}")
            print(
                "time the same shapes with PyTorch's semi-structured kernels: "
                "python benchmarks/torch_sparse_gemm.py"
            )
            return 1
    dense, sparse = timings["dense"], timings["sparse"]
    print(f"dense {dense.median_ms:.3f} ms, sparse {sparse.median_ms:.3f} ms (median of {args.iterations})")
    print(f"dense/sparse latency ratio: {dense.median_ms / sparse.median_ms:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
