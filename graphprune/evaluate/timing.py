"""Speed on this CPU: ONNX models timed against a baseline in interleaved rounds, in one process, on one feed.

Each round runs every model once, in turn, so a change of load on the machine (other processes, frequency
scaling) hits all of them alike; the medians over the rounds are compared. Every model runs once before the
first round (allocations, kernel selection and ONNX Runtime's pre-packing are not what a user waits for).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from graphprune.errors import GraphpruneError

Clock = Callable[[], tuple[float, float]]
"""Returns (wall seconds, CPU seconds of this process) at the moment it is called."""


def process_clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


@dataclass(frozen=True)
class Timing:
    """One model's median seconds per run, wall and CPU (all threads of this process)."""

    name: str
    wall_s: float
    cpu_s: float


@dataclass(frozen=True)
class SpeedComparison:
    """Medians of ``rounds`` interleaved rounds; ``timings[0]`` is the baseline every speed-up is against."""

    timings: list[Timing]
    rounds: int

    def speedup(self, index: int) -> float:
        """Baseline wall time over this model's: 2.0 means twice as fast."""
        return self.timings[0].wall_s / self.timings[index].wall_s

    def cpu_speedup(self, index: int) -> float:
        return self.timings[0].cpu_s / self.timings[index].cpu_s

    def to_dict(self) -> dict[str, Any]:
        rows = [
            {
                "model": t.name,
                "wall_s": t.wall_s,
                "cpu_s": t.cpu_s,
                "speedup": round(self.speedup(i), 3),
                "cpu_speedup": round(self.cpu_speedup(i), 3),
            }
            for i, t in enumerate(self.timings)
        ]
        return {"rounds": self.rounds, "models": rows}


def interleave(
    runs: Sequence[Callable[[], object]], rounds: int, clock: Clock = process_clock
) -> list[list[tuple[float, float]]]:
    """Call each of ``runs`` once to warm it up, then ``rounds`` times in turn (0, 1, .., 0, 1, ..);
    returns each run's (wall, CPU) durations, one per round."""
    if rounds < 1:
        raise GraphpruneError(f"`rounds` must be at least 1, got {rounds}")
    for run in runs:
        run()
    durations: list[list[tuple[float, float]]] = [[] for _ in runs]
    for _ in range(rounds):
        for run, spent in zip(runs, durations, strict=True):
            wall, cpu = clock()
            run()
            wall_end, cpu_end = clock()
            spent.append((wall_end - wall, cpu_end - cpu))
    return durations


def compare_runs(
    names: Sequence[str], runs: Sequence[Callable[[], object]], rounds: int, clock: Clock = process_clock
) -> SpeedComparison:
    """Time ``runs`` (the first is the baseline) in interleaved rounds; medians per run."""
    durations = interleave(runs, rounds, clock)
    timings = [
        Timing(name, statistics.median(w for w, _ in spent), statistics.median(c for _, c in spent))
        for name, spent in zip(names, durations, strict=True)
    ]
    return SpeedComparison(timings, rounds)


def compare_models(
    models: Sequence[str | Path], feed: Mapping[str, np.ndarray], rounds: int = 5
) -> SpeedComparison:
    """ONNX Runtime CPU sessions of ``models`` (the baseline first; all graph optimisations on, so Q/DQ pairs
    become integer kernels) timed on ``feed``, computing their first output."""
    from graphprune.evaluate.perplexity import open_session

    sessions = [open_session(m) for m in models]

    def runner(session: Any) -> Callable[[], object]:
        first = [session.get_outputs()[0].name]
        wanted = {i.name for i in session.get_inputs()}
        return lambda: session.run(first, {k: v for k, v in feed.items() if k in wanted})

    return compare_runs([str(m) for m in models], [runner(s) for s in sessions], rounds)


def synthetic_feed(model: str | Path, seqlen: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One random sample for ``model``'s inputs, every dynamic dimension but the first (batch 1) ``seqlen``
    long; token ids within the embedding table they index."""
    import onnx

    from graphprune.calibration.signature import model_inputs
    from graphprune.calibration.synthetic import SyntheticSource

    loaded = onnx.load(str(model), load_external_data=False)  # the signature and table shapes are enough
    specs = model_inputs(loaded)
    shapes = {
        s.name: tuple(
            d if isinstance(d, int) and d > 0 else (1 if i == 0 else seqlen) for i, d in enumerate(s.dims)
        )
        for s in specs
        if s.dims is not None
    }
    source = SyntheticSource(loaded, specs, shapes, nsamples=1, seed=seed)
    return dict(next(iter(source))[1])
