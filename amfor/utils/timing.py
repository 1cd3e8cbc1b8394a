"""Timing several steps together: each in turn, round after round, in reverse order every other round; and the
processor's name, for the record of what a timing was measured on.

Used by the benchmarks (`benchmarks.common`) and by `projects.ablation.step_costs`; standard library only, so that the
op benchmarks import on a machine without the model stack's packages.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Mapping
from pathlib import Path


def cpu_name() -> str:
    """The processor's model name ("AMD EPYC ..."), for the record of what a timing was measured on."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "unknown"


def interleaved_times(steps: Mapping[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds of every step in each of `rounds` rounds, the steps taken in turn within a round and in reverse
    order every other round (A B, B A, ...), so that a drift of the machine's speed and any cost of following
    another step reach every step alike. The caller synchronises the device inside a step."""
    names = list(steps)
    times = {name: [] for name in names}
    for i in range(rounds):
        for name in (names if i % 2 == 0 else names[::-1]):
            t = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t)
    return times
