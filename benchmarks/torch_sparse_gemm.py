"""Dense FP16 GEMM vs 2:4 sparse GEMM (PyTorch semi-structured sparse tensors) at real models' layer shapes.

Usage (needs a CUDA GPU with compute capability >= 8.0):

    python benchmarks/torch_sparse_gemm.py --tokens 512,4096,16384 [--model pruned.onnx ...] [--backend cutlass]

Prints one Markdown table per backend: for every layer shape (out x K) and token count (batch x sequence), the
median time of ``W @ X`` dense and with ``W`` as a 2:4 semi-structured tensor, and the ratio dense/sparse
(above 1: sparse is faster). Layer shapes are random 2:4 weights (timing does not depend on the values); with
``--model`` the weights of a pruned ONNX model are also checked (exact round trip through
``to_sparse_semi_structured``) and timed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from graphprune.tensorrt import bench_torch as bt

# (model, layer, out, K): nn.Linear-style weights, K = in_features.
SHAPES = [
    ("SmolLM2-135M", "q/o_proj", 576, 576),
    ("SmolLM2-135M", "k/v_proj", 192, 576),
    ("SmolLM2-135M", "gate/up_proj", 1536, 576),
    ("SmolLM2-135M", "down_proj", 576, 1536),
    ("BERT-base", "attention q/k/v/o", 768, 768),
    ("BERT-base", "intermediate", 3072, 768),
    ("BERT-base", "output", 768, 3072),
    ("LLaMA-7B", "q/k/v/o_proj", 4096, 4096),
    ("LLaMA-7B", "gate/up_proj", 11008, 4096),
    ("LLaMA-7B", "down_proj", 4096, 11008),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="512,4096,16384", help="token counts, e.g. 512,4096")
    parser.add_argument("--model", action="append", default=[], help="pruned ONNX model(s) to check and time")
    parser.add_argument("--backend", choices=["cusparselt", "cutlass", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    tokens = bt.parse_tokens(args.tokens)
    cases = [bt.GemmCase(f"{model} {layer}", out, k) for model, layer, out, k in SHAPES]
    model_cases = []
    for path in args.model:
        import onnx

        found = bt.model_cases(onnx.load(path), include_head=True)
        model_cases += [bt.GemmCase(f"{Path(path).stem}: {c.name}", c.out, c.k, c.weight) for c in found]
        print(f"{path}: {len(found)} weights 2:4 along K", flush=True)
    model_names = {c.name for c in model_cases}
    print(bt.device_description(), flush=True)
    backends = ["cusparselt", "cutlass"] if args.backend == "both" else [args.backend]
    for backend in backends:
        results = bt.bench_cases(cases + model_cases, tokens, backend, args.repeats)  # type: ignore[arg-type]
        print(f"\n### {backend}\n")
        print(bt.markdown_table(results), flush=True)
        checked = {r.name: r.converts for r in results if r.name in model_names}
        if checked:
            ok = sum(checked.values())
            print(f"\nmodel weights accepted by to_sparse_semi_structured, exact round trip: {ok}/{len(checked)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
