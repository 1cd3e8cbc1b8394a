"""Plots and a results table from benchmark JSON: a PNG per op, one for the model step, a Markdown table.

    python -m benchmarks.plot RESULTS.json [MORE.json ...] [--out benchmarks/results/plots]
                              [--readme benchmarks/README.md]

Reads what the benchmarks write: pytest-benchmark's JSON (`pytest benchmarks/ --benchmark-json=FILE`), the report
of `python -m benchmarks.gpu_report` (`benchmarks/results/<date>-<gpu>.json`: the rows benchmarks/conftest.py records,
with or without pytest-benchmark) and those rows as written, the JSON-lines file named by $AMFOR_BENCH_JSON.
Each benchmark is named by its test and described by its `extra_info` (op, provider, mode, sizes, median_ms, bytes,
images_per_s); when the same benchmark on the same machine appears in several files, the latest run is kept.

Writes into --out: `<op>.png` (throughput against problem size, one line per provider, one panel per mode and dtype),
`model_step.png` and `dropin_step.png` (images/s, bars) and `results.md` (the table and the plots); --readme
rewrites only the part of that file between `<!-- results:start -->` and `<!-- results:end -->`.
Exit code 2, with the file named, for a missing file, a file that is not benchmark JSON, or one without benchmarks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- results:start -->", "<!-- results:end -->"
REFERENCE = "reference"  # benchmarks.common.REFERENCE (not imported: that module needs torch)
MODES = ("forward", "backward", "full")
SIZE_KEYS = ("B", "G", "Q", "L", "N", "K", "C", "D", "H")  # extra_info keys that describe a problem size
OP_OF_TEST = {"test_query_fusion_op": "query_fusion", "test_query_fusion_module": "query_fusion_module"}
# end-to-end steps: test -> (plot name, the keys that name the configuration, the provider key, its reference)
STEPS = {"test_training_step": ("model_step", ("config",), "backend", "torch"),
         "test_dropin_training_step": ("dropin_step", ("case",), "provider", REFERENCE),
         "test_end_to_end": ("end_to_end", ("mode", "config"), "provider", REFERENCE)}
# test_model.py, each one interleaved run rendered as lines: every configuration (best of N rounds), and the
# ops' share of the full step
INTERLEAVED = ("test_full_vs_baseline", "test_op_share")
# ops whose benchmark records no bytes: what one call processes, and its unit
ITEMS = {"query_fusion_module": ("tokens/s", lambda info: info["B"] * info["L"] * info["N"])}


class PlotError(Exception):
    """A problem with an input file or the README's markers; main() prints it and exits with code 2."""


@dataclass
class Run:
    """One input file: the machine it ran on, when, and its raw rows (name, file, info = extra_info, median_ms)."""

    path: Path
    machine: str
    caption: str
    when: datetime.datetime
    rows: list[dict]


@dataclass
class Result:
    """One benchmark, normalised: what was timed (op, mode, size, provider) and how fast it ran."""

    op: str
    mode: str
    size: str
    provider: str
    median_ms: float
    throughput: float
    unit: str
    dtype: str
    machine: str
    sizes: dict
    info: dict


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------
def load_run(path: Path) -> Run:
    """Read one file in any of the three formats; PlotError naming the file when it is none of them."""
    if not path.is_file():
        raise PlotError(f"{path}: no such file")
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = _json_lines(text, path)
    if isinstance(data, dict) and isinstance(data.get("benchmarks"), list):
        run = _pytest_benchmark_run(path, data) if "machine_info" in data else _report_run(path, data)
    elif isinstance(data, list) and data and all(_is_row(r) for r in data) or _is_row(data):
        run = Run(path, "unknown machine", "machine not recorded", _mtime(path), [_flat_row(r) for r in _listed(data)])
    else:
        raise PlotError(f"{path}: not benchmark JSON (expected pytest-benchmark's --benchmark-json output, a "
                        "benchmarks.gpu_report report or $AMFOR_BENCH_JSON rows)")
    run.rows = [r for r in run.rows if r["name"] and r["median_ms"] is not None]
    if not run.rows:
        raise PlotError(f"{path}: no benchmarks in it (did every benchmark skip?)")
    return run


def _json_lines(text: str, path: Path) -> list[dict]:
    try:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise PlotError(f"{path}: not benchmark JSON ({exc})") from None
    if not rows or not all(_is_row(r) for r in rows):
        raise PlotError(f"{path}: not benchmark JSON (lines that are not benchmark rows)")
    return rows


def _is_row(data) -> bool:
    return isinstance(data, dict) and "name" in data and "median_ms" in data


def _listed(data) -> list[dict]:
    return data if isinstance(data, list) else [data]


def _mtime(path: Path) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc)


def _when(text: str | None, path: Path) -> datetime.datetime:
    try:
        when = datetime.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return _mtime(path)
    return when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc)


def _pytest_benchmark_run(path: Path, data: dict) -> Run:
    """pytest-benchmark: machine_info (torch / gpu when benchmarks/conftest.py added them), stats in seconds."""
    info = data["machine_info"] or {}
    cpu = info.get("cpu") or {}
    cpu_name = f"{cpu.get('brand_raw') or info.get('processor') or info.get('machine', 'CPU')}"
    cpu_name += f" ({cpu['count']} cores)" if cpu.get("count") else ""
    machine = info.get("gpu") or f"CPU {cpu_name}"
    torch = f"torch {info['torch']}" if info.get("torch") else "torch version not recorded"
    commit = (data.get("commit_info") or {}).get("id") or "unknown"
    python = f"; python {info['python_version']}" if info.get("python_version") else ""
    caption = f"{machine}; {torch}{python}; commit {commit[:10]}"
    rows = []
    for bench in data["benchmarks"]:
        extra = dict(bench.get("extra_info") or {})
        median = extra.get("median_ms")
        if median is None and (bench.get("stats") or {}).get("median") is not None:
            median = bench["stats"]["median"] * 1e3
        file = (bench.get("fullname") or "").split("::")[0]
        rows.append({"name": bench.get("name"), "file": file, "info": extra, "median_ms": median})
    return Run(path, machine, caption, _when(data.get("datetime"), path), rows)


def _report_run(path: Path, data: dict) -> Run:
    """benchmarks.gpu_report: an environment and flat rows (name, file, extra_info..., median_ms)."""
    env = data.get("environment") or {}
    machine = env.get("device") or "unknown machine"
    caption = (f"{machine}; torch {env.get('torch', '?')}; cuda {env.get('cuda') or '-'}; "
               f"commit {str(env.get('commit') or 'unknown')[:10]}")
    return Run(path, machine, caption, _when(env.get("date"), path), [_flat_row(r) for r in data["benchmarks"]])


def _flat_row(row: dict) -> dict:
    info = {k: v for k, v in row.items() if k not in ("name", "file")}
    return {"name": row.get("name"), "file": row.get("file", ""), "info": info, "median_ms": row.get("median_ms")}


def latest_rows(runs: list[Run]) -> list[tuple[Run, dict]]:
    """Every benchmark once per machine: the row of its latest run (the later file on a tie)."""
    chosen: dict[tuple, tuple[Run, dict]] = {}
    order: list[tuple] = []
    for run in runs:
        for row in run.rows:
            key = (run.machine, row["file"], row["name"])
            if key not in chosen:
                order.append(key)
            if key not in chosen or run.when >= chosen[key][0].when:
                chosen[key] = (run, row)
    return [chosen[key] for key in order]


# ---------------------------------------------------------------------------------------------------------
# Normalising: one Result per benchmark
# ---------------------------------------------------------------------------------------------------------
def normalise(pairs: list[tuple[Run, dict]]) -> tuple[list[Result], list[tuple[Run, dict]]]:
    """Results of the op and step benchmarks, and the interleaved model runs (INTERLEAVED) apart."""
    results, interleaved = [], []
    for run, row in pairs:
        test = row["name"].split("[")[0]
        if test in INTERLEAVED:
            interleaved.append((run, row))
        else:
            results.append(_result(test, run, row))
    _label_sizes(results)
    _common_units(results)
    return results, interleaved


def _result(test: str, run: Run, row: dict) -> Result:
    info, median = row["info"], float(row["median_ms"])
    if test in STEPS:
        op, size_keys, provider_key, _ = STEPS[test]
        ips = info.get("images_per_s")
        ips = ips if isinstance(ips, (int, float)) else info.get("batch", 1) / (median * 1e-3)
        size = " ".join(str(info.get(k, "-")) for k in size_keys)
        return Result(op, "step", size, str(info.get(provider_key, "-")), median, ips, "images/s", "", run.machine,
                      {}, info)
    op = info.get("op") or OP_OF_TEST.get(test) or test.removeprefix("test_")
    provider = str(info.get("provider") or info.get("backend") or "-")
    provider += f" ({info['path']})" if info.get("path") else ""
    throughput, unit = _throughput(op, info, median)
    sizes = {k: info[k] for k in SIZE_KEYS if k in info}
    dtype = str(info.get("dtype", "")).removeprefix("torch.")
    return Result(op, str(info.get("mode", "-")), "", provider, median, throughput, unit, dtype, run.machine, sizes,
                  info)


def _throughput(op: str, info: dict, median_ms: float) -> tuple[float, str]:
    """GB/s when the benchmark recorded the bytes the op must move, else items/s, else calls/s."""
    if isinstance(info.get("bytes"), (int, float)):
        return info["bytes"] / (median_ms * 1e-3) / 1e9, "GB/s"
    if op in ITEMS:
        unit, count = ITEMS[op]
        try:
            return count(info) / (median_ms * 1e-3), unit
        except KeyError:
            pass
    return 1e3 / median_ms, "calls/s"


def _label_sizes(results: list[Result]) -> None:
    """Size label of the op benchmarks from the size keys that vary within the op (all when none varies).

    One key: `C=751`; several: `Q10-L4-N242`, as the benchmarks' test ids write them.
    """
    for op in _ordered(r.op for r in results):
        rows = [r for r in results if r.op == op and r.mode != "step"]
        keys = _ordered(k for r in rows for k in r.sizes)
        varying = [k for k in keys if len({r.sizes[k] for r in rows if k in r.sizes}) > 1] or keys
        for r in rows:
            present = [k for k in varying if k in r.sizes]
            one = len(present) == 1
            r.size = "-".join(f"{k}{'=' * one}{r.sizes[k]}" for k in present) or "-"


def _common_units(results: list[Result]) -> None:
    """Within an op every row in one unit: calls/s for all when the rows disagree."""
    for op in _ordered(r.op for r in results):
        rows = [r for r in results if r.op == op]
        if len({r.unit for r in rows}) > 1:
            for r in rows:
                r.throughput, r.unit = 1e3 / r.median_ms, "calls/s"


def _ordered(items) -> list:
    """Distinct items in order of first appearance (the benchmarks' parametrisation order)."""
    return list(dict.fromkeys(items))


def reference_of(result: Result) -> str:
    """The provider the speed-up compares against: `reference` for ops, the torch backend for the model step."""
    for op, _, _, reference in STEPS.values():
        if result.op == op:
            return reference
    return REFERENCE


def speedups(results: list[Result]) -> dict[int, float]:
    """id(result) -> reference median / its median, for rows whose reference ran on the same problem and machine;
    where the benchmark timed both in the same interleaved rounds (`paired_speedup`), that figure instead."""
    key = lambda r: (r.machine, r.op, r.mode, r.dtype, r.size)  # noqa: E731
    refs = {key(r): r.median_ms for r in results if r.provider == reference_of(r)}
    ups = {id(r): refs[key(r)] / r.median_ms for r in results if key(r) in refs}
    ups.update({id(r): float(r.info["paired_speedup"]) for r in results
                if isinstance(r.info.get("paired_speedup"), (int, float))})
    return ups


# ---------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------
def _figure(ncols: int, nrows: int = 1, width: float = 5.5) -> tuple[Figure, list]:
    """A figure drawn by the Agg canvas (no pyplot) and its axes, row by row."""
    fig = Figure(figsize=(width * ncols, 4.2 * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(nrows, ncols, squeeze=False).flat)


def _line_label(r: Result, machines: int) -> str:
    return f"{r.provider} [{r.machine}]" if machines > 1 else r.provider


def _lines(rows: list[Result], machines: int) -> list[tuple[str, str]]:
    """(provider, legend label) of each line, the reference first, then in order of appearance."""
    lines = _ordered((r.provider, _line_label(r, machines)) for r in rows)
    return sorted(lines, key=lambda line: line[0] != REFERENCE)


def _grid(rows: list[Result]) -> tuple[list[str], list[str]]:
    """Modes (forward, backward, full first) and dtypes of an op's rows: the columns and rows of its figure."""
    modes = _ordered(r.mode for r in rows)
    modes.sort(key=lambda m: MODES.index(m) if m in MODES else len(MODES))
    return modes, _ordered(r.dtype for r in rows)


def plot_op(op: str, rows: list[Result], captions: list[str], path: Path) -> None:
    """<op>.png: throughput against problem size, a line per provider, a panel per mode (columns) and dtype (rows)."""
    modes, dtypes = _grid(rows)
    sizes = _ordered(r.size for r in rows)
    fig, axes = _figure(len(modes), len(dtypes), width=max(5.5, 0.3 * len(sizes) + 2))
    machines = len({r.machine for r in rows})
    for i, ax in enumerate(axes):
        mode, dtype = modes[i % len(modes)], dtypes[i // len(modes)]
        panel = [r for r in rows if r.mode == mode and r.dtype == dtype]
        if not panel:
            ax.set_visible(False)
            continue
        _draw_lines(ax, panel, sizes, machines)
        ax.set_title(" ".join(x for x in (mode, dtype) if x and x != "-") or op)
    fig.suptitle(f"{op}: throughput by problem size\n" + "\n".join(captions), fontsize=9)
    fig.savefig(path, dpi=110)


def _draw_lines(ax, panel: list[Result], sizes: list[str], machines: int) -> None:
    """One panel: a line per provider (the reference dashed black) over the sizes, log y over a decade or more."""
    for provider, label in _lines(panel, machines):
        by_size = {r.size: r.throughput for r in panel if _line_label(r, machines) == label}
        style = dict(color="black", linestyle="--") if provider == REFERENCE else {}
        ax.plot(range(len(sizes)), [by_size.get(s, math.nan) for s in sizes], marker="o", label=label, **style)
    values = [r.throughput for r in panel if r.throughput > 0]
    if values and max(values) / min(values) >= 10:
        ax.set_yscale("log")
    slanted = dict(rotation=30, ha="right") if len(sizes) > 4 else {}
    ax.set_xticks(range(len(sizes)), sizes, fontsize=8, **slanted)
    ax.set_xlabel("problem size")
    ax.set_ylabel(f"{panel[0].unit} (higher is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_steps(name: str, rows: list[Result], interleaved: list[tuple[Run, dict]], captions: list[str],
               path: Path) -> None:
    """<name>.png: images/s per configuration and backend (bars); the interleaved run in a second panel."""
    fig, axes = _figure(1 + bool(interleaved), width=6.5)
    ax, machines = axes[0], len({r.machine for r in rows})
    configs = _ordered(r.size for r in rows)
    labels = _ordered(_line_label(r, machines) for r in rows)
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        by_config = {r.size: r.throughput for r in rows if _line_label(r, machines) == label}
        x = [c + (i - (len(labels) - 1) / 2) * width for c in range(len(configs))]
        bars = ax.bar(x, [by_config.get(c, 0.0) for c in configs], width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(configs)), configs)
    ax.set_ylabel("images/s (higher is better)")
    ax.set_title(f"{name.replace('_', ' ')}: median of the timed rounds")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    if interleaved:
        _plot_interleaved(axes[1], interleaved)
    what = ("training step (forward + backward + update) and inference (no grad)" if name == "end_to_end" else
            "end-to-end training step (forward + backward + update)")
    fig.suptitle(f"{name}: {what}\n" + "\n".join(captions), fontsize=9)
    fig.savefig(path, dpi=110)


def _plot_interleaved(ax, interleaved: list[tuple[Run, dict]]) -> None:
    run, row = interleaved[-1]
    ips = row["info"].get("images_per_s") or {}
    names = list(ips)
    bars = ax.barh(range(len(names)), [ips[n] for n in names], color="tab:gray")
    ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("images/s (higher is better)")
    ax.set_title(f"one interleaved run ({row['info'].get('backend', '?')}, best of the rounds)", fontsize=9)
    ax.grid(alpha=0.3, axis="x")


def write_plots(results: list[Result], interleaved: list[tuple[Run, dict]], captions: dict[str, str],
                out: Path) -> list[Path]:
    """Every PNG into `out`; returns their paths in the order the table lists the ops."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    step_names = [s[0] for s in STEPS.values()]
    for op in _ordered(r.op for r in results if r.provider != "-"):  # no provider (evaluation): table only
        rows = [r for r in results if r.op == op]
        machine_captions = [captions[m] for m in _ordered(r.machine for r in rows)]
        path = out / f"{op}.png"
        if op in step_names:
            mine = interleaved if op == "model_step" else []
            plot_steps(op, rows, mine, machine_captions, path)
        else:
            plot_op(op, rows, machine_captions, path)
        paths.append(path)
    if interleaved and "model_step" not in {r.op for r in results}:
        path = out / "model_step.png"
        plot_steps("model_step", [], interleaved, [captions[interleaved[-1][0].machine]], path)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------
def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def table(results: list[Result]) -> str:
    """The Markdown table: op, mode, size, provider, median ms, throughput, speed-up vs the reference (and peak
    memory when a benchmark recorded it)."""
    ups = speedups(results)
    machine = len({r.machine for r in results}) > 1  # a machine column only when the files come from several
    memory = any(isinstance(r.info.get("peak_memory_bytes"), (int, float)) for r in results)
    head = ["op", "mode", "size"] + ["machine"] * machine + ["provider", "median ms", "throughput",
                                                             "speed-up vs reference"] + ["peak MiB"] * memory
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * (len(head) - 3 - memory) + "---:|" * (3 + memory)]
    for r in _table_order(results):
        size = f"{r.size} {r.dtype}".strip() if len({x.dtype for x in results if x.op == r.op}) > 1 else r.size
        up = f"{ups[id(r)]:.2f}x" if id(r) in ups else "-"
        ci = r.info.get("paired_speedup_ci")
        up += f" (paired, {ci[0]:.2f}-{ci[1]:.2f})" if isinstance(ci, list) and len(ci) == 2 else ""
        cells = [r.op, r.mode, size] + [r.machine] * machine + [r.provider, f"{r.median_ms:.4g}",
                                                                 f"{_number(r.throughput)} {r.unit}", up]
        if memory:
            peak = r.info.get("peak_memory_bytes")
            cells.append(f"{peak / 2**20:,.0f}" if isinstance(peak, (int, float)) else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _table_order(results: list[Result]) -> list[Result]:
    ops, sizes = _ordered(r.op for r in results), _ordered(r.size for r in results)
    dtypes, providers = _ordered(r.dtype for r in results), _ordered(r.provider for r in results)
    mode = lambda m: MODES.index(m) if m in MODES else len(MODES)  # noqa: E731
    return sorted(results, key=lambda r: (ops.index(r.op), mode(r.mode), dtypes.index(r.dtype), sizes.index(r.size),
                                          r.provider != reference_of(r), providers.index(r.provider), r.machine))


def op_share_lines(run: Run, info: dict) -> list[str]:
    """test_op_share: each op's replayed calls per backend, ms per step, and the share of the whole step."""
    op_ms, total = info.get("op_ms") or {}, info.get("total_ms") or {}
    if not op_ms or not total:
        return []
    per_op = "; ".join(f"{op} ({info.get('calls', {}).get(op, '?')} calls) "
                       + ", ".join(f"{b} {ms:.2f}" for b, ms in by_backend.items()) for op, by_backend in op_ms.items())
    return [f"- {run.machine}, `{info.get('model', '?')}` batch {info.get('batch', '?')}: the fused ops' calls of one "
            f"full step, replayed alone (forward + backward, median of {info.get('rounds', '?')} interleaved rounds "
            f"with the step), take " + ", ".join(f"{b} {ms:.1f} ms ({100 * info['share'][b]:.1f}%)"
                                                 for b, ms in total.items())
            + f" of the {info['step_ms']:.1f} ms step (`{info.get('step_backend', '?')}`)" + _step_pair(info),
            f"  - ms per step: {per_op}"]


def _step_pair(info: dict) -> str:
    """"; the step on the torch ops N ms, `cpp` Rx that per round (95% interval)", where recorded."""
    paired = info.get("step_speedup_paired")
    if not (isinstance(paired, list) and len(paired) == 3 and "torch_step_ms" in info):
        return ""
    return (f"; the step on the torch ops {info['torch_step_ms']:.1f} ms, `{info.get('step_backend', '?')}` "
            f"{paired[0]:.3f}x that per round (95% interval {paired[1]:.3f}-{paired[2]:.3f})")


def interleaved_lines(interleaved: list[tuple[Run, dict]]) -> list[str]:
    """test_full_vs_baseline: images/s of every configuration in one run, the ratio and each component's cost;
    test_op_share: the ops' share of the full step."""
    lines = []
    for run, row in interleaved:
        info = row["info"]
        if row.get("name", "").split("[")[0] == "test_op_share":
            lines += op_share_lines(run, info)
            continue
        ips = info.get("images_per_s") or {}
        if not isinstance(ips, dict) or not ips:
            continue
        paired = info.get("ratio_paired"), info.get("speedup_vs_torch_ops_paired")
        per_round = all(isinstance(x, list) and len(x) == 3 for x in paired)
        target = f"target >= {info.get('target_ratio', '?')}"
        # the target is judged on the per-round median where the run has one (older runs: on the best of rounds)
        ratio = ""
        if "ratio" in info:
            ratio = f", ratio {info['ratio']:.2f}" + ("" if per_round else f" ({target})")
        if "speedup_vs_torch_ops" in info:
            ratio += (f"; the full step on the torch reference ops {_number(info['torch_ops_images_per_s'])} img/s, "
                      f"`{info.get('backend', '?')}` {info['speedup_vs_torch_ops']:.2f}x that")
        if per_round:
            ratio += (f"; per round (median, 95% interval): ratio {paired[0][0]:.3f} ({paired[0][1]:.3f}-"
                      f"{paired[0][2]:.3f}; {target}), {paired[1][0]:.3f}x the torch ops ({paired[1][1]:.3f}-"
                      f"{paired[1][2]:.3f})")
        lines.append(f"- {run.machine}, `{info.get('model', '?')}` batch {info.get('batch', '?')} on "
                     f"`{info.get('backend', '?')}` (best of the rounds, one interleaved run): "
                     + ", ".join(f"{k} {_number(v)} img/s" for k, v in ips.items()) + ratio)
        cost = info.get("marginal_ms") or {}
        if cost:
            lines.append("  - marginal cost per component (ms of the full step): "
                         + ", ".join(f"{k} {v:.1f}" for k, v in cost.items()))
    return lines


def markdown(results: list[Result], interleaved: list[tuple[Run, dict]], runs: list[Run], pngs: list[Path],
             base: Path) -> str:
    """The results section: where and when it was measured, the table, the interleaved model run, the plots."""
    lines = ["Measured on:", ""]
    lines += [f"- {run.caption}; run {run.when:%Y-%m-%d %H:%M} UTC (`{run.path.name}`)" for run in runs]
    lines += ["", "Generated by `python -m benchmarks.plot` from the files above; latest run of each benchmark.", ""]
    lines += [table(results)] if results else ["(no op or step benchmark in these files)"]
    extra = interleaved_lines(interleaved)
    if extra:
        lines += ["", "Full model against its baseline, interleaved:", ""] + extra
    lines += ["", "Plots:", ""]
    for png in pngs:
        rel = os.path.relpath(png, base).replace(os.sep, "/")
        lines += [f"![{png.stem}]({rel})", ""]
    return "\n".join(lines).rstrip() + "\n"


def replace_section(path: Path, body: str) -> None:
    """Rewrite the text between the results markers of `path` (created, or the markers appended, when missing)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# Benchmarks\n\n## Results\n\n{START}\n{body}{END}\n")
        return
    text = path.read_text()
    start, end = text.find(START), text.find(END)
    if start < 0 and end < 0:
        path.write_text(text.rstrip("\n") + f"\n\n## Results\n\n{START}\n{body}{END}\n")
        return
    if start < 0 or end < start or text.count(START) > 1 or text.count(END) > 1:
        raise PlotError(f"{path}: expected one {START} followed by one {END}")
    path.write_text(text[: start + len(START)] + "\n" + body + text[end:])


# ---------------------------------------------------------------------------------------------------------
# Command
# ---------------------------------------------------------------------------------------------------------
def build(paths: list[Path], out: Path, readme: Path | None) -> tuple[list[Result], list[Path]]:
    """Read `paths`, write the PNGs and results.md into `out`, and the README section when asked."""
    runs = [load_run(p) for p in paths]
    pairs = latest_rows(runs)
    results, interleaved = normalise(pairs)
    captions = {run.machine: run.caption for run in runs}
    pngs = write_plots(results, interleaved, captions, out)
    used = [run for run in runs if any(r is run for r, _ in pairs)]
    (out / "results.md").write_text("# Benchmark results\n\n" + markdown(results, interleaved, used, pngs, out))
    if readme is not None:
        replace_section(readme, markdown(results, interleaved, used, pngs, readme.parent))
    return results, pngs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="benchmark JSON files (pytest-benchmark or gpu_report)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "plots",
                        help="folder for the PNGs and results.md")
    parser.add_argument("--readme", type=Path, help="Markdown file whose results section is rewritten")
    args = parser.parse_args(argv)
    try:
        results, pngs = build(args.results, args.out, args.readme)
    except PlotError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(results)} results, {len(pngs)} plots in {args.out}: " + ", ".join(p.name for p in pngs))
    if args.readme is not None:
        print(f"rewrote the results section of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
