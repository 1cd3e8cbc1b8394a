"""One call on a lent GPU machine: build, the op tests on CUDA, two training runs, the benchmarks, as a report.

    python3 -m benchmarks.gpu_report [--quick] [--out benchmarks/results] [--deadline EPOCH_S] [--setup-log FILE]
                                     [--workdir DIR] [--budget-PHASE S ...]

Run by `scripts/gpu_check.sh`, which installs the wheels the machine lacks first. Made for a short loan of a bare
machine (no network, maybe no pytest-benchmark, about 15 minutes for everything):
- phases in order of value, each under its own time budget (its process group is ended when the budget is spent),
  each writing its part of the report the moment it ends (`<out>/<date>-<gpu>[-quick].json` and `.md`, and $OUT when
  set; a phase that starts is written as "running" first, so a report cut short says where):
  1. `build`: `python3 setup.py build_ext --inplace` (amfor._C with its CUDA kernels; ninja when on PATH);
  2. `ops`: every op test on CUDA, for every built backend and dtype (`tests/ops`, `tests/nn`; `-k "cuda or gpu"`);
  3. `train_tiny`: `python3 -m amfor.train` on the GPU, the tiny model with every component on, 50 bf16 steps;
  4. `train_base`: the same for a few steps of the base model (ViT-B/16 at 256x128, the text tower);
  5. `bench`: the headline benchmarks (one size per op, AMFOR_BENCH_QUICK=1) without the torch.compile providers,
     whose cold compile would take most of the budget; then the device's ceilings and the docs/design.md targets;
  6. `rest`, with whatever time is left: every benchmark (compiled providers included), then the other tests.
- `--quick`: the budgets of QUICK_BUDGETS, whose sum with the start-up and a reserve fits QUICK_TOTAL_S (< 7
  minutes, checked at import); `rest` gets what the other phases leave. Without --quick: FULL_BUDGETS.
- `--deadline`: the wall-clock time (seconds since the epoch) by which everything must be written; no phase starts
  or runs past it (gpu_check.sh passes its own start + QUICK_TOTAL_S).
- Without a CUDA device every phase is skipped, with the reason, and the report is still written (exit code 1).
Figures are given as ratios to the other providers of their problem (`x_vs_<peer>`, benchmarks/targets.py).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.targets import ceilings, verdicts, with_ratios

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("build", "ops", "train_tiny", "train_base", "bench", "rest")
TITLES = {"build": "Build (amfor._C with the CUDA kernels)", "ops": "Op tests on CUDA (tests/ops, tests/nn)",
          "train_tiny": "Training: tiny model, 50 bf16 steps (CLI)", "train_base": "Training: base model (CLI)",
          "bench": "Headline benchmarks (no torch.compile providers)",
          "rest": "The rest: every benchmark, then the other tests"}
QUICK_BUDGETS = {"build": 100, "ops": 100, "train_tiny": 55, "train_base": 40, "bench": 45}
FULL_BUDGETS = {"build": 1200, "ops": 1200, "train_tiny": 600, "train_base": 600, "bench": 2400, "rest": 3600}
SETUP_S = 25  # gpu_check.sh before this script: the wheels' install; then this script's start (torch, amfor)
RESERVE_S = 15  # after the last phase: the ceilings' measurement and the last writes
QUICK_TOTAL_S = 400  # gpu_check.sh --quick from start to last write; + the kill grace, under 7 minutes
GRACE_S = 5  # SIGTERM, then SIGKILL this much later
MIN_PHASE_S = 10  # a phase with less time than this left is not started
assert SETUP_S + sum(QUICK_BUDGETS.values()) + RESERVE_S <= QUICK_TOTAL_S <= 7 * 60 - 2 * GRACE_S
NO_GPU = "no CUDA device (torch.cuda.is_available() is False)"
TRAIN_SWITCHES = ("amff", "text", "amgd", "hpr", "part_recon")  # every component on: the most code on the GPU
OP_BENCH = ["benchmarks/test_masked_patches.py", "benchmarks/test_query_fusion.py", "benchmarks/test_distill_loss.py"]
OUTCOMES = ("PASSED", "FAILED", "SKIPPED", "ERROR", "XFAIL", "XPASS")


# ---------------------------------------------------------------------------------------------------------------
# environment


def environment(with_amfor: bool = True) -> dict:
    """Device name, versions, commit, optional packages and (with_amfor) the extension and the backends that run;
    without: before the build, so that amfor._C is not imported (and found missing) before it exists."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": _device_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": os.environ.get("AMFOR_COMMIT") or _git_commit(),
        "cuda_home": os.environ.get("CUDA_HOME"),
    }
    for package in ("triton", "timm", "open_clip", "omegaconf", "scipy", "matplotlib", "pytest", "pytest_benchmark",
                    "xformers", "liger_kernel"):
        info[package] = _version(package)
    if not with_amfor:
        info["extension"] = "not imported yet: the build phase comes first"
        return info
    try:
        from amfor.ops import available_backends, extension_status

        info["extension"] = extension_status()[1]
        info["backends"] = available_backends("cuda" if torch.cuda.is_available() else "cpu")
    except Exception as exc:  # noqa: BLE001 - the report says why amfor itself does not import
        info["extension"] = f"amfor.ops failed to import: {type(exc).__name__}: {exc}"
    return info


def _version(package: str) -> str | None:
    """The installed version of the distribution that provides import name `package`, None when not importable."""
    try:
        if importlib.util.find_spec(package) is None:
            return None
    except (ImportError, ValueError):
        return None
    from importlib import metadata

    for dist in _distributions().get(package, [package.replace("_", "-")]):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "installed"


@functools.cache
def _distributions() -> dict[str, list[str]]:
    from importlib import metadata

    return metadata.packages_distributions()


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---------------------------------------------------------------------------------------------------------------
# running a command under a budget


def run_command(cmd: list[str], budget: float, log: Path, env: dict | None = None) -> dict:
    """Run `cmd` from the repository root with its output in `log`; past `budget` seconds its whole process group
    gets SIGTERM, GRACE_S later SIGKILL (the budget includes that grace). Returns exit_code (None when ended),
    timed_out, seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=max(budget - GRACE_S, 1))
        except subprocess.TimeoutExpired:
            timed_out = True
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
    return {"command": " ".join(cmd), "exit_code": None if timed_out else proc.returncode, "timed_out": timed_out,
            "seconds": round(time.monotonic() - start, 1), "log": str(log)}


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _tail(path: Path, chars: int) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def run_pytest(args: list[str], budget: float, log: Path, env: dict | None = None) -> dict:
    """pytest with `args` under a budget; outcomes from its -v lines (every test finished before a timeout counts).
    A test module that cannot import is listed, the others run (--continue-on-collection-errors)."""
    cmd = [sys.executable, "-m", "pytest", *args, "-v", "-rfEs", "-p", "no:cacheprovider",
           "--continue-on-collection-errors"]
    run = run_command(cmd, budget, log, env)
    text = _tail(log, 10**7)
    outcomes = re.findall(r"^(\S+::\S+) (" + "|".join(OUTCOMES) + r")\b", text, flags=re.M)
    run["counts"] = {o.lower(): sum(1 for _, x in outcomes if x == o) for o in OUTCOMES}
    run["failed"] = [name for name, o in outcomes if o in ("FAILED", "ERROR")]
    run["collection_errors"] = re.findall(r"^ERROR collecting (\S+)", text, flags=re.M)
    run["missing_modules"] = sorted(set(re.findall(r"No module named '([\w.]+)'", text)))
    run["skipped"] = sorted(set(re.findall(r"^SKIPPED \[\d+\] (.*)$", text, flags=re.M)))[:200]
    run["summary"] = text.strip().splitlines()[-1] if text.strip() else ""
    ran = sum(run["counts"].values())
    run["state"] = ("timed out" if run["timed_out"] else "passed" if run["exit_code"] == 0 and ran
                    else "failed" if run["exit_code"] not in (0, 5) or run["failed"] else "nothing ran")
    if run["state"] != "passed":
        run["log_tail"] = text[-6000:]
    return run


# ---------------------------------------------------------------------------------------------------------------
# the phases: each returns its part of the report (a dict with "state")


class Context:
    """What the phases share: the mode, where logs and runs go, the report's rows."""

    def __init__(self, quick: bool, workdir: Path) -> None:
        self.quick, self.workdir = quick, workdir
        self.rows: list[dict] = []


def phase_build(ctx: Context, budget: float) -> dict:
    """amfor._C in place, with the CUDA kernels (nvcc from CUDA_HOME; MAX_JOBS parallel compiles under ninja)."""
    if not os.environ.get("CUDA_HOME"):
        return {"state": "skipped", "reason": "no nvcc (CUDA_HOME unset): the CUDA kernels cannot be built; the "
                "`cuda` backend's tests skip, the `triton` backend runs"}
    env = {"AMFOR_BUILD_CUDA": "1", "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 4))}
    log = ctx.workdir / "build.log"
    run = run_command([sys.executable, "setup.py", "build_ext", "--inplace"], budget, log, env)
    run["ninja"] = _which("ninja")
    run["state"] = "timed out" if run["timed_out"] else "passed" if run["exit_code"] == 0 else "failed"
    if run["state"] != "passed":
        run["log_tail"] = _tail(log, 6000)
    return run


def _which(program: str) -> str | None:
    import shutil

    return shutil.which(program)


def phase_ops(ctx: Context, budget: float) -> dict:
    """Every op test on CUDA (the cuda-parametrised cases and the tests marked gpu), every built backend and dtype."""
    return run_pytest(["tests/ops", "tests/nn", "tests/evaluation/test_rank.py", "-k", "cuda or gpu"], budget,
                      ctx.workdir / "ops.log")


def _train(ctx: Context, budget: float, name: str, overrides: list[str], steps: int) -> dict:
    """`python3 -m amfor.train` on the GPU on the tiny synthetic set; the run's own metrics summarised."""
    run_dir, data = ctx.workdir / f"run-{name}", ctx.workdir / "data"
    cmd = [sys.executable, "-m", "amfor.train", "--data-root", str(data), "--output", str(run_dir), "--device", "cuda",
           "--set", "data.size=tiny", "data.num_workers=2", "train.batch_size=16", "train.stage1_epochs=1",
           f"train.max_steps={steps}", "train.max_minutes=0", "train.eval_every=0", "train.checkpoint_every=100000",
           "train.amp=bf16", "test.num_ranked=2", *[f"model.kwargs.{k}=true" for k in TRAIN_SWITCHES], *overrides]
    log = ctx.workdir / f"train_{name}.log"
    run = run_command(cmd, budget, log)
    run.update(summarise_run(run_dir / "metrics.jsonl"))
    reached = run.get("stage2_steps") == steps and run.get("test_mAP") is not None
    run["state"] = ("timed out" if run["timed_out"] else "passed" if run["exit_code"] == 0 and reached
                    else "failed")
    if run["state"] != "passed":
        run["log_tail"] = _tail(log, 6000)
    return run


def summarise_run(metrics: Path) -> dict:
    """From a run's metrics.jsonl: stage-2 steps, first and last logged loss, median img/s, test mAP, last record."""
    try:
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as exc:
        return {"metrics": f"no metrics: {exc}"}
    train = [r for r in records if r.get("type") == "train" and r.get("stage") == 2]
    test = [r for r in records if r.get("type") == "test"]
    out: dict = {"stage1_records": sum(1 for r in records if r.get("type") == "train" and r.get("stage") == 1),
                 "stage2_steps": max((r.get("step", 0) for r in train), default=0)}
    if train:
        speeds = sorted(r["img_s"] for r in train if isinstance(r.get("img_s"), int | float))
        out.update(first_loss=train[0].get("loss"), last_loss=train[-1].get("loss"),
                   img_s_median=speeds[len(speeds) // 2] if speeds else None, last_train_record=train[-1])
    out["test_mAP"] = test[-1].get("query/mAP") if test else None
    return out


def phase_train_tiny(ctx: Context, budget: float) -> dict:
    return _train(ctx, budget, "tiny", [], steps=50)


def phase_train_base(ctx: Context, budget: float) -> dict:
    return _train(ctx, budget, "base", ["model.name=amfor_vit_base_patch16", "train.log_every=1"], steps=3)


def run_benchmarks(ctx: Context, name: str, args: list[str], budget: float, quick: bool) -> dict:
    """The benchmarks, each row written by benchmarks/conftest.py as soon as it is measured (kept on a timeout)."""
    rows_file = ctx.workdir / f"{name}-rows.jsonl"
    rows_file.unlink(missing_ok=True)
    env = {"AMFOR_BENCH_JSON": str(rows_file), "AMFOR_BENCH_QUICK": "1" if quick else "0"}
    run = run_pytest(args, budget, ctx.workdir / f"{name}.log", env)
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
    ctx.rows += rows
    run["rows"] = len(rows)
    return run


def phase_bench(ctx: Context, budget: float) -> dict:
    """Headline sizes without the compiled providers (quick), or every benchmark; then ceilings and targets."""
    args = [*OP_BENCH, "-k", "not compiled"] if ctx.quick else ["benchmarks"]
    run = run_benchmarks(ctx, "bench", args, budget, ctx.quick)
    try:
        run["ceilings"] = ceilings("cuda")
    except RuntimeError as exc:  # e.g. out of memory on a shared device: the report keeps everything else
        run["ceilings"] = {"error": str(exc)[:300]}
    return run


def phase_rest(ctx: Context, budget: float) -> dict:
    """What is left, in order of value: (quick) every benchmark, then the tests not run yet."""
    start, parts = time.monotonic(), {}
    if ctx.quick:
        files = ["benchmarks/test_model.py", "benchmarks/test_dropin.py", *OP_BENCH, "benchmarks/test_evaluation.py"]
        parts["benchmarks"] = run_benchmarks(ctx, "rest-bench", files, budget, quick=False)
    left = budget - (time.monotonic() - start)
    if left >= MIN_PHASE_S:
        args = ["tests", "-k", "not (cuda or gpu)", "--ignore=tests/test_gpu_check.py"]  # not this script again
        args += ["-m", "not slow" if ctx.quick else "slow or not slow"]  # pytest's default is the fast tier
        parts["tests"] = run_pytest(args, left, ctx.workdir / "rest-tests.log")
    states = [p["state"] for p in parts.values()]
    state = ("timed out" if "timed out" in states else "failed" if "failed" in states
             else "passed" if states else "not reached")
    return {"state": state, "seconds": round(time.monotonic() - start, 1), "parts": parts}


RUNNERS: dict[str, Callable[[Context, float], dict]] = {
    "build": phase_build, "ops": phase_ops, "train_tiny": phase_train_tiny, "train_base": phase_train_base,
    "bench": phase_bench, "rest": phase_rest}


# ---------------------------------------------------------------------------------------------------------------
# the report


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _phase_summary(phase: dict) -> str:
    """One line: what the phase found."""
    if phase["state"] in ("skipped", "not reached", "running"):
        return phase.get("reason", "")
    if "counts" in phase:
        counts = ", ".join(f"{n} {k}" for k, n in phase["counts"].items() if n) or "nothing ran"
        return counts + (f"; {phase['rows']} benchmark rows" if "rows" in phase else "")
    if "stage2_steps" in phase:
        return (f"{phase['stage2_steps']} stage-2 steps, loss {_fmt(phase.get('first_loss'))} -> "
                f"{_fmt(phase.get('last_loss'))}, {_fmt(phase.get('img_s_median'))} img/s, test mAP "
                f"{_fmt(phase.get('test_mAP'))}")
    if "parts" in phase:
        return "; ".join(f"{name}: {_phase_summary(p)}" for name, p in phase["parts"].items())
    return f"exit code {phase.get('exit_code')}" + (f"; {phase['metrics']}" if phase.get("metrics") else "")


def _phase_details(name: str, phase: dict) -> list[str]:
    lines = ["", f"## {TITLES[name]}", "", f"{phase['state']}: {_phase_summary(phase)}"]
    if phase.get("command"):
        lines.append(f"- `{phase['command']}` ({phase.get('seconds')} s of a {phase.get('budget_s')} s budget)")
    lines += [f"- failed: {n}" for n in phase.get("failed", [])]
    lines += [f"- could not collect: {n}" for n in phase.get("collection_errors", [])]
    if phase.get("missing_modules"):
        lines.append(f"- missing modules (what needs them was skipped): {', '.join(phase['missing_modules'])}")
    if phase.get("last_train_record"):
        lines.append(f"- last stage-2 record: `{json.dumps(phase['last_train_record'])}`")
    for part, sub in phase.get("parts", {}).items():
        lines += [f"- {part}: {sub['state']}, `{sub['command']}` ({sub['seconds']} s)"]
        lines += [f"  - failed: {n}" for n in sub.get("failed", [])]
    if phase.get("log_tail"):
        lines += ["", "```", *phase["log_tail"].strip().splitlines()[-25:], "```"]
    return lines


def _ceiling_lines(ceil: dict | None) -> list[str]:
    if not ceil:
        return []
    if "error" in ceil:
        return ["", "## Ceilings (same run)", "", f"not measured: {ceil['error']}"]
    return ["", "## Ceilings (same run)", "",
            f"- device-to-device copy of {ceil['copy_bytes'] / 2**20:.0f} MiB: {ceil['copy_GB/s']:.1f} GB/s "
            "(read + write; every `copy_fraction` is against a copy of its own byte count, measured next to it)",
            f"- {ceil['matmul_dtype']} matmul {ceil['matmul_n']}^3: {ceil['matmul_TFLOP/s']:.2f} TFLOP/s"]


def markdown(report: dict) -> str:
    """The report as Markdown: environment, a table of the phases, each phase, ceilings, targets, benchmark tables."""
    env = report["environment"]
    lines = [f"# amfor GPU report: {env['device']}", "", f"**{report.get('verdict', 'running')}**", ""]
    lines += [f"- {key}: {_fmt(value)}" for key, value in env.items()]
    lines += [f"- setup: {line}" for line in report.get("setup", [])]
    phases = report.get("phases", {})
    lines += ["", "| phase | budget s | state | s | summary |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {p.get('budget_s', '')} | {p['state']} | {p.get('seconds', '')} | "
              f"{_phase_summary(p).replace('|', '/')} |" for name, p in phases.items()]
    for name, phase in phases.items():
        lines += _phase_details(name, phase)
    lines += _ceiling_lines(phases.get("bench", {}).get("ceilings"))
    if report.get("targets"):
        mark = {True: "met", False: "NOT met", None: "not judged"}
        lines += ["", "## Targets (docs/design.md)", "", "| target | verdict | on |", "|---|---|---|"]
        lines += [f"| {t['target']} | {mark[t['met']]} | {t['detail']} |" for t in report["targets"]]
    by_file: dict[str, list[dict]] = {}
    for row in report.get("benchmarks", []):
        by_file.setdefault(row["file"], []).append(row)
    for file, rows in by_file.items():
        keys = [k for k in rows[0] if k != "file"]
        for row in rows[1:]:
            keys += [k for k in row if k not in keys and k != "file"]
        lines += ["", f"### {file}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_fmt(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write(report: dict, stem: Path) -> None:
    """Write (again) the JSON and Markdown report, and copy them to $OUT when set; called around every phase."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(report, indent=2, default=str)), (".md", markdown(report))):
        tmp = stem.with_name(stem.name + suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(stem.with_suffix(suffix))  # never a half-written report
    out = os.environ.get("OUT")
    if out and Path(out).is_dir():
        for suffix in (".json", ".md"):
            (Path(out) / (stem.name + suffix)).write_text(stem.with_suffix(suffix).read_text())


def budgets(quick: bool, overrides: dict[str, float | None]) -> dict[str, float | None]:
    """Seconds per phase; None: until the deadline (quick's `rest`)."""
    chosen: dict[str, float | None] = dict(QUICK_BUDGETS if quick else FULL_BUDGETS)
    chosen.setdefault("rest", None)
    chosen.update({k: v for k, v in overrides.items() if v is not None})
    return chosen


def run_phases(report: dict, stem: Path, ctx: Context, limits: dict[str, float | None], deadline: float | None,
               gpu: bool) -> None:
    """Each phase in order under its budget (cut to the deadline), the report written as it starts and ends."""
    phases = report["phases"]
    for name in PHASES:
        budget = limits[name]
        left = None if deadline is None else deadline - time.time() - RESERVE_S
        if left is not None:
            budget = left if budget is None else min(budget, left)
        if not gpu:
            phases[name] = {"state": "skipped", "budget_s": limits[name], "reason": NO_GPU}
        elif budget is None or budget < MIN_PHASE_S:
            phases[name] = {"state": "not reached", "budget_s": limits[name],
                            "reason": "the total time budget is spent"}
        else:
            phases[name] = {"state": "running", "budget_s": round(budget), "reason": "started at "
                            f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}"}
            write(report, stem)
            phases[name] = {"budget_s": round(budget), **RUNNERS[name](ctx, budget)}
        if name == "build" and gpu:  # the extension (and so the backends) exist only now
            report["environment"].update(environment())
        if ctx.rows:
            report["benchmarks"] = with_ratios(ctx.rows)
            report["targets"] = verdicts(report["benchmarks"], "cuda")
        print(f"{name}: {phases[name]['state']}: {_phase_summary(phases[name])}", flush=True)
        write(report, stem)


def verdict(report: dict) -> tuple[int, str]:
    states = {name: p["state"] for name, p in report["phases"].items()}
    ran = [s for s in states.values() if s not in ("skipped", "not reached")]
    bad = [f"{name} {s}" for name, s in states.items() if s in ("failed", "timed out", "nothing ran")]
    if not ran:
        return 1, "nothing ran: " + "; ".join(sorted({p.get("reason", "") for p in report["phases"].values()}))
    if bad:
        return 1, "FAILED: " + ", ".join(bad)
    return 0, "every phase that ran passed"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--quick", action="store_true", help="the quick budgets (fits 7 minutes with gpu_check.sh)")
    parser.add_argument("--deadline", type=float, help="seconds since the epoch by which everything is written")
    parser.add_argument("--setup-log", help="lines gpu_check.sh wrote about its setup (wheels, CUDA_HOME, ninja)")
    parser.add_argument("--workdir", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "amfor-gpu-check"),
                        help="logs, the training runs and their data")
    for phase in PHASES:
        parser.add_argument(f"--budget-{phase.replace('_', '-')}", type=float, dest=f"budget_{phase}",
                            help=f"seconds for the {phase} phase")
    args = parser.parse_args(argv)
    if args.deadline is None and args.quick:
        args.deadline = time.time() + QUICK_TOTAL_S - SETUP_S
    limits = budgets(args.quick, {p: getattr(args, f"budget_{p}") for p in PHASES})
    gpu = torch.cuda.is_available()
    report: dict = {"environment": environment(with_amfor=not gpu), "quick": args.quick, "budgets_s": limits,
                    "deadline": None if args.deadline is None else datetime.datetime.fromtimestamp(
                        args.deadline, datetime.timezone.utc).isoformat(timespec="seconds"),
                    "setup": [], "phases": {}}
    if args.setup_log and Path(args.setup_log).exists():
        report["setup"] = [line for line in Path(args.setup_log).read_text().splitlines() if line.strip()]
    device = re.sub(r"[^A-Za-z0-9]+", "-", report["environment"]["device"]).strip("-")
    stem = Path(args.out) / f"{datetime.date.today().isoformat()}-{device}{'-quick' if args.quick else ''}"
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if gpu and importlib.util.find_spec("pytest") is None:
        report["error"] = "pytest is not installed: no test or benchmark can run"
    write(report, stem)
    run_phases(report, stem, Context(args.quick, workdir), limits, args.deadline, gpu)
    status, report["verdict"] = verdict(report)
    write(report, stem)
    print(f"{report['verdict']}; wrote {stem}.json and {stem}.md")
    return status


if __name__ == "__main__":
    sys.exit(main())
