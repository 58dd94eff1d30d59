"""Time of the --permute channel search on SmolLM2-135M's 60 exact groups (30 MLPs, 30 attention blocks).

    python benchmarks/permutation_search.py [--stats stats.npz]

Scores are Wanda's |W|·‖X‖ with ``--stats`` (saved by ``graphprune calibrate``), else |W|. Prints per kind the
groups, CPU and wall seconds of the search alone (finding the groups and reading the model excluded), and the
mean share of the lost importance recovered. CPU seconds are the figure to compare on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from graphprune.algorithms.layout import to_canonical
from graphprune.algorithms.pattern import NMPattern
from graphprune.algorithms.permutation import search_permutation
from graphprune.algorithms.scores import magnitude_scores, wanda_scores
from graphprune.graph.model_io import load_model
from graphprune.graph.stored import stored_values
from graphprune.graph.weights import read_weight
from graphprune.passes.permute import find_channel_groups

CACHE = Path(os.environ.get("GRAPHPRUNE_CACHE", Path.home() / ".cache" / "graphprune"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=CACHE / "smollm2" / "model.onnx")
    parser.add_argument("--stats", type=Path, default=None)
    args = parser.parse_args()
    model = load_model(args.model)
    sumsq = {}
    if args.stats:
        from graphprune.calibration.stats import ActivationStats

        sumsq = dict(ActivationStats.load(args.stats).sumsq)
    groups, weights = find_channel_groups(model)
    store = stored_values(model.graph)
    pattern = NMPattern(2, 4)
    by_kind: dict[str, list[tuple[float, float, float]]] = {}
    for group in groups.values():
        reader = weights[group.reader]
        w = to_canonical(read_weight(store, reader).effective(), reader.k_axis, reader.out_axis)[:, 0, :]
        scores = wanda_scores(w, sumsq[reader.name]) if reader.name in sumsq else magnitude_scores(w)
        cpu, wall = time.process_time(), time.perf_counter()
        found = search_permutation(scores.reshape(-1, group.period), pattern)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        kind = "mlp" if group.period == group.channels else "heads"
        by_kind.setdefault(kind, []).append((cpu, wall, found.recovered))
    print(f"scores: {'wanda' if sumsq else 'magnitude'}")
    print("| groups | count | search CPU s | search wall s | mean recovered |")
    print("| --- | ---: | ---: | ---: | ---: |")
    total = np.zeros(2)
    for kind, rows in by_kind.items():
        a = np.array(rows)
        total += a[:, :2].sum(axis=0)
        print(f"| {kind} | {len(rows)} | {a[:, 0].sum():.1f} | {a[:, 1].sum():.1f} | {a[:, 2].mean():.1%} |")
    print(f"| all | {sum(len(r) for r in by_kind.values())} | {total[0]:.1f} | {total[1]:.1f} | |")


if __name__ == "__main__":
    main()
