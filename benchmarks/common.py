"""Timing helpers shared by the benchmarks (`pytest benchmarks/`).

On a GPU, `measure` times with CUDA events through `triton.testing.do_bench` (median, L2 flushed between
runs, warm-up first so compilation is not timed) and records the figure in `benchmark.extra_info`, where
`benchmarks.gpu_report` reads it; pytest-benchmark's own statistics are kept too, with a synchronise inside
the callable. On the CPU it is pytest-benchmark's wall clock.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from amfor.testing import require_backend
from amfor.utils.timing import interleaved_times  # noqa: F401  (re-exported: the benchmarks time pairs with it)

# One vocabulary in every benchmark file: providers and modes.
REFERENCE, REFERENCE_COMPILED = "reference", "reference_compiled"  # our eager reference and its torch.compile
KERNELS = ("triton", "cuda", "cpp")  # our kernels; a peer goes by its own name (mae, sdpa_loop, xformers, liger)
MODES = ("forward", "backward", "full")  # full = forward + backward
QUICK = os.environ.get("AMFOR_BENCH_QUICK") == "1"  # headline sizes only (gpu_report --quick)


def interleaved_rounds(default: int) -> int:
    """Rounds of an interleaved comparison: $AMFOR_BENCH_ROUNDS when set (more rounds, a tighter interval), else
    `default`."""
    value = os.environ.get("AMFOR_BENCH_ROUNDS", "")
    if not value:
        return default
    if not value.isdigit() or int(value) < 2:
        raise ValueError(f"AMFOR_BENCH_ROUNDS must be an integer >= 2, got {value!r}")
    return int(value)


def skip_unless(device: str, backend: str, op: str | None = None) -> None:
    """Skip the benchmark, with the reason, when `backend` cannot run (`op`) on `device`."""
    require_backend(device, backend, op)


def gpu_median_ms(fn: Callable[[], object]) -> float:
    """Median time of fn() in ms on the current CUDA device (CUDA events, L2 flushed)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def measure(benchmark, fn: Callable[[], object], device: str, *, bytes_moved: int | None = None,
            rounds: int = 20, **info) -> float:
    """Time fn on `device`; record median ms (and GB/s when bytes_moved is given) in benchmark.extra_info.

    Returns the median in milliseconds.
    """
    fn()  # warm-up: compilation, autotuning, allocator
    if device == "cuda":
        torch.cuda.synchronize()
        median_ms = gpu_median_ms(fn)
        benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=rounds, warmup_rounds=2)
    else:
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1)
        median_ms = stats_median_ms(benchmark, fn)
    benchmark.extra_info.update(info)
    benchmark.extra_info["median_ms"] = median_ms
    if bytes_moved is not None:
        benchmark.extra_info["bytes"] = bytes_moved
        benchmark.extra_info["GB/s"] = bytes_moved / (median_ms * 1e-3) / 1e9
    return median_ms


def stats_median_ms(benchmark, fn: Callable[[], object], rounds: int = 3) -> float:
    """pytest-benchmark's median in ms, or, under --benchmark-disable (no statistics kept), the median of `rounds`
    wall-clock calls timed here, so a disabled run still works as a smoke test of every benchmark."""
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        return stats.stats.median * 1e3
    import statistics
    import time

    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def median_interval(values: list[float], resamples: int = 2000) -> tuple[float, float, float]:
    """(median, 2.5%, 97.5%) of per-round figures: the interval is a bootstrap of the median over the rounds (a fixed
    seed, so the same figures give the same interval)."""
    import random
    import statistics

    rng = random.Random(0)
    boot = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return statistics.median(values), boot[int(0.025 * resamples)], boot[int(0.975 * resamples) - 1]


def _paired(reference_s: list[float], new_s: list[float]) -> list[tuple[float, float]]:
    if len(reference_s) != len(new_s) or not reference_s:
        raise ValueError(f"paired figures need the same number (> 0) of rounds, got {len(reference_s)} and "
                         f"{len(new_s)}")
    return list(zip(reference_s, new_s, strict=True))


def paired_speedup(reference_s: list[float], new_s: list[float], resamples: int = 2000) -> tuple[float, float, float]:
    """(median, 2.5%, 97.5%) of the per-round ratio reference / new over rounds timed together (interleaved_times):
    > 1 means `new` is faster (`median_interval`)."""
    return median_interval([a / b for a, b in _paired(reference_s, new_s)], resamples)


def paired_difference(reference_s: list[float], new_s: list[float], resamples: int = 2000
                      ) -> tuple[float, float, float]:
    """(median, 2.5%, 97.5%) of the per-round difference reference - new, in the times' unit: what `reference` costs
    more than `new` in the same round (e.g. a component's marginal cost: the full step against the step without it)."""
    return median_interval([a - b for a, b in _paired(reference_s, new_s)], resamples)


def check_close(actual: torch.Tensor, expected: torch.Tensor, what: str, tol: float | None = None) -> None:
    """The provider's result against the reference before it is timed (tolerance by dtype unless given)."""
    tol = tol if tol is not None else {torch.bfloat16: 3e-2, torch.float16: 5e-3}.get(actual.dtype, 1e-4)
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def copy_bandwidth_gbps(nbytes: int, device: str) -> float:
    """GB/s of a device-to-device copy of `nbytes` (read + write counted), measured now."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = device_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def device_ms(fn: Callable[[], object], device: str) -> float:
    """Time of one fn() in ms outside pytest-benchmark: CUDA-event median on a GPU, best of 5 x 5 calls on the CPU."""
    if device == "cuda":
        return gpu_median_ms(fn)
    import timeit

    fn()
    return min(timeit.repeat(fn, number=5, repeat=5)) / 5 * 1e3


def peak_memory_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak memory of one fn() call above what was live before it, in bytes.

    CUDA: the caching allocator's peak (torch.cuda.max_memory_allocated after a reset). CPU: the profiler's record
    of every CPU allocation and free during the call (each event's own allocations, frees as "[memory]" events),
    summed in time order; the peak of that running total.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return int(peak)


def shape_script_args(description: str, default_runs: int, argv: list[str] | None = None):
    """The command line of the kernel-shape scripts (`--threads`, `--runs`), the thread count set, and the header
    line naming the host printed: the parsed arguments."""
    import argparse

    from amfor.utils.timing import cpu_name

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=default_runs, help="timed rounds per case (after 2 warm-up rounds)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# {cpu_name()}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads, "
          f"best / median of {args.runs} (ms)")
    return args
