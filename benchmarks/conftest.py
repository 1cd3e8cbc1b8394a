"""Benchmarks run with or without pytest-benchmark, and write what they measured where gpu_report asks.

- Without pytest-benchmark (a bare GPU machine), a small `benchmark` fixture stands in: `pedantic(...)`,
  `extra_info`, `group`, `stats.stats.median`; calling it times the function. Nothing else is skipped.
- With AMFOR_BENCH_JSON=<path>, every finished benchmark appends one row (name, file, extra_info, median_ms) to
  that JSON-lines file at once, so a run cut short by a timeout still leaves every figure measured before it.
- AMFOR_BENCH_QUICK=1 (gpu_report --quick): each file keeps only its headline sizes (benchmarks.common.QUICK).
- With pytest-benchmark, `--benchmark-json` records torch's version and the GPU in machine_info, where
  `python -m benchmarks.plot` finds them for its captions.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import time
import types

import pytest

# AMFOR_BENCH_STANDIN=1 (with -p no:benchmark) tries the stand-in where pytest-benchmark is installed
HAS_PYTEST_BENCHMARK = (importlib.util.find_spec("pytest_benchmark") is not None
                        and os.environ.get("AMFOR_BENCH_STANDIN") != "1")


class _Stand_in:
    """The part of pytest-benchmark's fixture the benchmarks use."""

    def __init__(self):
        self.extra_info: dict = {}
        self.group = None
        self.stats = None

    def _record(self, times: list[float]) -> None:
        self.stats = types.SimpleNamespace(stats=types.SimpleNamespace(median=statistics.median(times)))

    def pedantic(self, fn, args=(), kwargs=None, setup=None, rounds=1, warmup_rounds=0, iterations=1):
        times, result = [], None
        for i in range(warmup_rounds + rounds):
            a, k = (args, kwargs or {}) if setup is None else setup()
            start = time.perf_counter()
            for _ in range(iterations):
                result = fn(*a, **k)
            if i >= warmup_rounds:
                times.append((time.perf_counter() - start) / iterations)
        self._record(times)
        return result

    def __call__(self, fn, *args, **kwargs):
        return self.pedantic(fn, args, kwargs, rounds=5, warmup_rounds=1)


if not HAS_PYTEST_BENCHMARK:

    @pytest.fixture
    def benchmark():
        return _Stand_in()


@pytest.hookimpl(optionalhook=True)  # a pytest-benchmark hook: unknown (and harmless) without the plugin
def pytest_benchmark_update_machine_info(config, machine_info):
    """Add torch's version and the GPU (none on a CPU run) to the machine_info of --benchmark-json."""
    import torch

    machine_info["torch"] = torch.__version__
    machine_info["cuda"] = torch.version.cuda
    machine_info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


@pytest.fixture(autouse=True)
def _record_figures(request):
    """After each benchmark, append its figures to $AMFOR_BENCH_JSON (one JSON object per line)."""
    path = os.environ.get("AMFOR_BENCH_JSON")
    # taken before the test, so that the benchmark fixture outlives this one's teardown
    bench = request.getfixturevalue("benchmark") if path and "benchmark" in request.fixturenames else None
    yield
    if bench is None:
        return
    info = dict(getattr(bench, "extra_info", {}) or {})
    stats = getattr(bench, "stats", None)
    if not info and stats is None:
        return  # skipped or failed before measuring
    row = {"name": request.node.name, "file": request.node.nodeid.split("::")[0]}
    row.update(info)
    if "median_ms" not in row and stats is not None:
        row["median_ms"] = stats.stats.median * 1e3
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
