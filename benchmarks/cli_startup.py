"""How long ``graphprune --help`` takes, next to an empty Python start, in one run.

Usage:

    python benchmarks/cli_startup.py [--rounds 15]

Each round starts ``python -m graphprune --help`` and ``python -c pass`` once each, in alternating order (so both
see the same machine load), and records the child's CPU time (user + system, from ``getrusage``) and wall time.
Prints the median of each and the difference: what graphprune's command line itself costs at start. CPU time is
the figure to compare across machines and loads; wall time on a busy machine mostly measures the queue.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "graphprune --help": [sys.executable, "-m", "graphprune", "--help"],
    "python -c pass": [sys.executable, "-c", "pass"],
}


def timed(argv: list[str]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one run of ``argv``, output discarded."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, check=True, env={**os.environ, "COLUMNS": "100"})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    cpu: dict[str, list[float]] = {name: [] for name in COMMANDS}
    wall: dict[str, list[float]] = {name: [] for name in COMMANDS}
    names = list(COMMANDS)
    for round_ in range(args.rounds + 1):
        order = names if round_ % 2 else names[::-1]
        for name in order:
            c, w = timed(COMMANDS[name])
            if round_:  # round 0 warms the file cache
                cpu[name].append(c)
                wall[name].append(w)
    print(f"{args.rounds} interleaved rounds, medians (load average {os.getloadavg()[0]:.1f})")
    print(f"{'command':<20} {'CPU s':>7} {'wall s':>7}")
    for name in names:
        print(f"{name:<20} {statistics.median(cpu[name]):7.3f} {statistics.median(wall[name]):7.3f}")
    help_cpu, pass_cpu = (statistics.median(cpu[n]) for n in names)
    print(f"graphprune's own start: {help_cpu - pass_cpu:.3f} s CPU")


if __name__ == "__main__":
    main()
