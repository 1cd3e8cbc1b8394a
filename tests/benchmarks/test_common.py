"""benchmarks/common.py: the CPU peak-memory measure against allocations of known size, the interleaved rounds."""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import peak_memory_bytes

MB = 1000 * 1000


def test_cpu_peak_memory_follows_allocations_and_frees():
    def fn():
        a = torch.empty(MB // 4)  # 1 MB live
        b = torch.empty(2 * MB // 4)  # 3 MB live
        del a, b  # 0 live
        c = torch.empty(5 * MB // 4)  # 5 MB live: the peak
        return c.numel()

    peak = peak_memory_bytes(fn, "cpu")
    assert 5 * MB <= peak < 5 * MB + 4096  # the freed 3 MB are not counted twice


def test_cpu_peak_memory_counts_what_is_live_together():
    def fn():
        keep = [torch.empty(MB // 4) for _ in range(4)]  # 4 x 1 MB live at once
        return len(keep)

    assert 4 * MB <= peak_memory_bytes(fn, "cpu") < 4 * MB + 4096


def test_interleaved_rounds_alternate_the_order_and_pair_the_times():
    from benchmarks.common import interleaved_times, paired_speedup

    calls = []
    times = interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=4)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"] and [len(t) for t in times.values()] == [4, 4]
    median, low, high = paired_speedup([2.0, 2.2, 1.8, 2.1, 2.0], [1.0, 1.0, 1.0, 1.05, 1.0])
    assert median == 2.0 and 1.8 <= low <= median <= high <= 2.2
    assert paired_speedup([1.0] * 3, [2.0] * 3) == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="same number"):
        paired_speedup([1.0], [1.0, 2.0])


def test_paired_differences_are_taken_round_by_round():
    """A component's marginal cost: full minus without, in each round, so a drift shared by a round cancels."""
    from benchmarks.common import paired_difference

    full, without = [0.50, 0.70, 0.52, 0.90], [0.40, 0.61, 0.41, 0.80]  # the machine slows in rounds 2 and 4
    median, low, high = paired_difference(full, without)
    assert median == pytest.approx(0.10) and 0.09 - 1e-9 <= low <= median <= high <= 0.11 + 1e-9
    assert paired_difference([1.0] * 3, [1.5] * 3) == (-0.5, -0.5, -0.5)
    with pytest.raises(ValueError, match="same number"):
        paired_difference([], [])


def test_interleaved_rounds_reads_the_environment(monkeypatch):
    from benchmarks.common import interleaved_rounds

    monkeypatch.delenv("AMFOR_BENCH_ROUNDS", raising=False)
    assert interleaved_rounds(8) == 8
    monkeypatch.setenv("AMFOR_BENCH_ROUNDS", "30")
    assert interleaved_rounds(8) == 30
    for bad in ("1", "ten", "-4"):
        monkeypatch.setenv("AMFOR_BENCH_ROUNDS", bad)
        with pytest.raises(ValueError, match="AMFOR_BENCH_ROUNDS must be an integer >= 2"):
            interleaved_rounds(8)
