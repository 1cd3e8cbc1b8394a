"""Timing several steps together: each in turn, round after round, in reverse order every other round.

Used by the benchmarks (`benchmarks.common`) and by `projects.ablation.step_costs`; standard library only, so that the
op benchmarks import on a machine without the model stack's packages.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping


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
