"""One command for a GPU machine: the op tests on CUDA, the other tests, the benchmarks, written as a report.

    python -m benchmarks.gpu_report [--quick] [--out benchmarks/results] [--build-log FILE]
                                    [--timeout-ops S] [--timeout-tests S] [--timeout-bench S]

Built for a short loan of a bare machine (no network, maybe no timm or pytest-benchmark):
- phases run in order of value, each with its own timeout, and the report (`<out>/<date>-<gpu>.json` and
  `.md`) is rewritten after every phase: first `tests/ops` (every op on CUDA for every built backend and
  dtype, compile, CUDA graphs, determinism), then the rest of `tests/`, then `benchmarks/`;
- a missing optional package skips only what needs it: pytest runs with --continue-on-collection-errors (a
  test module that cannot import is listed, the others run) and the benchmarks run without pytest-benchmark
  (benchmarks/conftest.py stands in); a phase that times out keeps every result it printed before;
- `--quick`: the op tests, then the headline benchmarks (one size per op, AMFOR_BENCH_QUICK=1); no other tests.
  With the build in scripts/gpu_check.sh it is meant to finish in 8 minutes.
After the benchmarks it measures the device's ceilings (copy bandwidth, matmul rate) in the same run, gives
every figure as a ratio to the other providers of its problem (`x_vs_<peer>`), and says which targets of
DESIGN.md are met (`benchmarks/targets.py`).
It also runs on a CPU machine, where the GPU tests and providers are skipped with their reasons.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.targets import ceilings, verdicts, with_ratios

ROOT = Path(__file__).resolve().parent.parent
TIMEOUTS = {"ops": 900, "tests": 900, "bench": 1800}
QUICK_TIMEOUTS = {"ops": 200, "tests": 0, "bench": 120}
OUTCOMES = ("PASSED", "FAILED", "SKIPPED", "ERROR", "XFAIL", "XPASS")


def environment() -> dict:
    """Device name, versions, commit, optional packages and the backends that run."""
    import torch

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": _device_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": os.environ.get("AMFOR_COMMIT") or _git_commit(),
        "cuda_home": os.environ.get("CUDA_HOME"),
    }
    for package in ("triton", "timm", "pytest", "pytest_benchmark", "xformers", "liger_kernel", "open_clip"):
        info[package] = _version(package)
    try:
        from amfor.ops import available_backends, extension_status

        info["extension"] = extension_status()[1]
        info["backends"] = available_backends("cuda" if torch.cuda.is_available() else "cpu")
    except Exception as exc:  # noqa: BLE001 - the report says why amfor itself does not import
        info["extension"] = f"amfor.ops failed to import: {type(exc).__name__}: {exc}"
    return info


def _version(package: str) -> str | None:
    if importlib.util.find_spec(package) is None:
        return None
    try:
        from importlib import metadata

        return metadata.version(package.replace("_", "-"))
    except Exception:  # noqa: BLE001 - installed but without metadata
        return "installed"


def _device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_pytest(args: list[str], timeout: float, env: dict | None = None) -> dict:
    """pytest with `args` under a timeout (the whole process group is ended); outcomes from its -v lines."""
    with tempfile.TemporaryFile("w+") as log:
        cmd = [sys.executable, "-m", "pytest", *args, "-v", "-rfEs", "-p", "no:cacheprovider",
               "--continue-on-collection-errors"]
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True  # the group, as projects.ablation.process.stop_group does: not imported, since this report
            os.killpg(proc.pid, signal.SIGTERM)  # must still run (and say why) when amfor itself fails to import
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.seek(0)
        text = log.read()
    outcomes = re.findall(r"^(\S+::\S+) (" + "|".join(OUTCOMES) + r")\b", text, flags=re.M)
    counts = {o.lower(): sum(1 for _, x in outcomes if x == o) for o in OUTCOMES}
    failed = [name for name, o in outcomes if o in ("FAILED", "ERROR")]
    collection = re.findall(r"^ERROR collecting (\S+)", text, flags=re.M)
    missing = sorted(set(re.findall(r"No module named '([\w.]+)'", text)))
    tail = text.strip().splitlines()[-1] if text.strip() else ""
    return {"command": " ".join(cmd[2:]), "exit_code": None if timed_out else proc.returncode, "timed_out": timed_out,
            "seconds": round(time.monotonic() - start, 1), "summary": tail, "counts": counts, "failed": failed,
            "collection_errors": collection, "missing_modules": missing,
            "skipped": re.findall(r"^SKIPPED \[\d+\] (.*)$", text, flags=re.M)[:200], "log_tail": text[-20000:]}


def run_benchmarks(paths: list[str], timeout: float, quick: bool) -> tuple[list[dict], dict]:
    """The benchmarks, each row written by benchmarks/conftest.py as soon as it is measured."""
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = Path(tmp) / "rows.jsonl"
        env = {"AMFOR_BENCH_JSON": str(rows_file), "AMFOR_BENCH_QUICK": "1" if quick else "0"}
        run = run_pytest(paths, timeout, env)
        rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
    if run["exit_code"] == 0:
        run.pop("log_tail", None)
    return rows, run


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _phase_lines(title: str, run: dict | None) -> list[str]:
    if run is None:
        return ["", f"## {title}", "", "not run"]
    state = "timed out" if run["timed_out"] else f"exit code {run['exit_code']}"
    counts = ", ".join(f"{n} {k}" for k, n in run["counts"].items() if n)
    lines = ["", f"## {title}", "", f"`{run['command']}`: {counts or 'nothing ran'} ({state}, {run['seconds']} s)"]
    lines += [f"- failed: {name}" for name in run["failed"]]
    lines += [f"- could not collect: {name}" for name in run["collection_errors"]]
    if run["missing_modules"]:
        lines.append(f"- missing modules (what needs them was skipped): {', '.join(run['missing_modules'])}")
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
    """The report as Markdown: environment, each phase, then one table per benchmark file."""
    env = report["environment"]
    lines = [f"# amfor GPU report: {env['device']}", ""]
    lines += [f"- {key}: {_fmt(value)}" for key, value in env.items()]
    if report.get("build"):
        lines += [f"- build: {report['build']}"]
    lines += _phase_lines("Op tests (tests/ops)", report.get("tests_ops"))
    lines += _phase_lines("Other tests", report.get("tests_rest"))
    lines += _phase_lines("Benchmarks", report.get("bench_run"))
    lines += _ceiling_lines(report.get("ceilings"))
    if report.get("targets"):
        mark = {True: "met", False: "NOT met", None: "not judged"}
        lines += ["", "## Targets (DESIGN.md)", "", "| target | verdict | on |", "|---|---|---|"]
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
    skipped = (report.get("bench_run") or {}).get("skipped", [])
    if skipped:
        lines += ["", "### Skipped providers", ""] + [f"- {s}" for s in sorted(set(skipped))]
    return "\n".join(lines) + "\n"


def write(report: dict, stem: Path) -> None:
    """Write (again) the JSON and Markdown report; called after every phase."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    stem.with_suffix(".md").write_text(markdown(report))
    out = os.environ.get("OUT")
    if out and Path(out).is_dir():
        for suffix in (".json", ".md"):
            (Path(out) / (stem.name + suffix)).write_text(stem.with_suffix(suffix).read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--quick", action="store_true", help="op tests and headline benchmarks only")
    parser.add_argument("--build-log", help="a file whose last line says how the build went (gpu_check.sh)")
    for phase in TIMEOUTS:
        parser.add_argument(f"--timeout-{phase}", type=float, help=f"seconds for the {phase} phase")
    args = parser.parse_args(argv)
    limits = dict(QUICK_TIMEOUTS if args.quick else TIMEOUTS)
    for phase in TIMEOUTS:
        if getattr(args, f"timeout_{phase}") is not None:
            limits[phase] = getattr(args, f"timeout_{phase}")
    report: dict = {"environment": environment(), "quick": args.quick, "timeouts": limits}
    if args.build_log and Path(args.build_log).exists():
        lines = Path(args.build_log).read_text().strip().splitlines()
        report["build"] = lines[-1] if lines else "empty build log"
    device = re.sub(r"[^A-Za-z0-9]+", "-", report["environment"]["device"]).strip("-")
    stem = Path(args.out) / f"{datetime.date.today().isoformat()}-{device}{'-quick' if args.quick else ''}"
    if importlib.util.find_spec("pytest") is None:
        report["error"] = "pytest is not installed: no test or benchmark can run"
        write(report, stem)
        print(report["error"], file=sys.stderr)
        return 1
    report["tests_ops"] = run_pytest(["tests/ops"], limits["ops"])
    write(report, stem)  # the op tests on CUDA are in the report now, whatever happens next
    print(f"op tests: {report['tests_ops']['counts']} -> {stem}.md", flush=True)
    if limits["tests"] > 0:
        report["tests_rest"] = run_pytest(["tests", "--ignore=tests/ops"], limits["tests"])
        write(report, stem)
    paths = (["benchmarks/test_masked_patches.py", "benchmarks/test_query_fusion.py", "benchmarks/test_distill_loss.py"]
             if args.quick else ["benchmarks"])
    rows, report["bench_run"] = run_benchmarks(paths, limits["bench"], args.quick)
    report["benchmarks"] = with_ratios(rows)
    write(report, stem)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        report["ceilings"] = ceilings(device)
    except RuntimeError as exc:  # e.g. out of memory on a shared device: the report keeps everything else
        report["ceilings"] = {"error": str(exc)[:300]}
    report["targets"] = verdicts(report["benchmarks"], device)
    write(report, stem)
    ops = report["tests_ops"]
    print(f"wrote {stem}.json and {stem}.md: op tests {ops['counts']}; {len(report['benchmarks'])} benchmarks")
    ok = all(r is None or (r["exit_code"] == 0) for r in (ops, report.get("tests_rest")))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
