"""ALPS's solver time against SparseGPT's on one SmolLM2-135M block's shapes, in the same process.

    python benchmarks/alps_time.py [--blocks 2] [--pattern 2:4|0.5] [--baseline OTHER/algorithms/alps.py]

Each block: Q/K/V (one input, K=576), O (K=576), gate/up (one input, K=576), down (K=1536), Gram matrices of
correlated synthetic activations (4096 rows). ALPS prepares one Gram matrix per input and solves the weights
that read it together, as the pruning pass does (``alps_solve_shared``). Prints CPU seconds (user + system
of this process, all threads; fair on a shared machine) and wall seconds of both solvers, their ratio, and
the reconstruction errors' ratio. Calibration, which a prune spends on top and which is the same for both,
is not included: the ratio of whole runs is lower.
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from graphprune.algorithms.alps import alps_solve_shared
from graphprune.algorithms.pattern import NMPattern, Pattern, Unstructured, parse_nm
from graphprune.algorithms.sparsegpt import sparsegpt
from graphprune.algorithms.sparsegpt import sparsegpt_reconstruction_error as reconstruction_error

# (input K, [output sizes of the weights that read that input])
BLOCK = [(576, [576, 192, 192]), (576, [576]), (576, [1536, 1536]), (1536, [576])]
Solver = Callable[[list[np.ndarray], np.ndarray, Pattern], list[np.ndarray]]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def gram(rng: np.random.Generator, k: int, rows: int = 4096) -> np.ndarray:
    x = rng.standard_normal((rows, k // 8)) @ rng.standard_normal((k // 8, k)) + rng.standard_normal((rows, k))
    x *= rng.lognormal(0.0, 1.0, size=k)  # a few channels much larger than the rest, as in an LLM
    return x.T @ x


def baseline_alps(path: Path) -> Solver:
    """ALPS from another copy of ``alps.py`` (e.g. main's), to time a change against it in the same process."""
    spec = importlib.util.spec_from_file_location("baseline_alps", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_alps"] = module
    spec.loader.exec_module(module)
    if hasattr(module, "alps_solve_shared"):
        return lambda ws, h, pattern: [r.weight for r in module.alps_solve_shared(ws, h, pattern)]

    def one_by_one(ws: list[np.ndarray], h: np.ndarray, pattern: Pattern) -> list[np.ndarray]:
        prepared = module.PreparedGram(h)  # one preparation per input, as the pass did
        return [module.alps(w, prepared, pattern) for w in ws]

    return one_by_one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--baseline", type=Path, help="also time the ALPS of this alps.py, alternating with ours")
    args = parser.parse_args()
    pattern = parse_nm(args.pattern) if ":" in args.pattern else Unstructured(float(args.pattern))
    solvers: dict[str, Solver] = {
        "sparsegpt": lambda ws, h, pattern: [sparsegpt(w, h, pattern) for w in ws],
        "alps": lambda ws, h, pattern: [r.weight for r in alps_solve_shared(ws, h, pattern)],
    }
    if args.baseline:
        solvers["alps baseline"] = baseline_alps(args.baseline)
    rng = np.random.default_rng(0)
    spent = {name: [0.0, 0.0] for name in solvers}
    errors = dict.fromkeys(solvers, 0.0)
    for block in range(args.blocks):
        for i, (k, outs) in enumerate(BLOCK):
            h = gram(rng, k)
            weights = [rng.standard_normal((out, k)).astype(np.float32) * 0.05 for out in outs]
            names = list(solvers)
            for name in names if (block + i) % 2 == 0 else names[::-1]:  # alternate who runs first
                cpu, wall = cpu_seconds(), time.perf_counter()
                pruned = solvers[name](weights, h, pattern)
                spent[name][0] += cpu_seconds() - cpu
                spent[name][1] += time.perf_counter() - wall
                errors[name] += sum(reconstruction_error(w, p, h) for w, p in zip(weights, pruned, strict=True))
    label = str(pattern) if isinstance(pattern, NMPattern) else f"{pattern.sparsity:.0%} unstructured"
    print(f"SmolLM2-135M block shapes x {args.blocks}, {label}")
    print("| solver | CPU s | wall s | reconstruction error |")
    print("| --- | ---: | ---: | ---: |")
    for name in spent:
        print(f"| {name} | {spent[name][0]:.1f} | {spent[name][1]:.1f} | {errors[name]:.4g} |")
    for other in [n for n in solvers if n != "alps"]:
        print(
            f"ALPS / {other}: CPU {spent['alps'][0] / spent[other][0]:.2f}x, "
            f"wall {spent['alps'][1] / spent[other][1]:.2f}x, error {errors['alps'] / errors[other]:.3f}x"
        )


if __name__ == "__main__":
    main()
