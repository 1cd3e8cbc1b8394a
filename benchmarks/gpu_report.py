"""One command for a GPU machine: every test (the GPU tier included) and every benchmark, written as a report.

    python -m benchmarks.gpu_report [--out benchmarks/results] [--tests tests] [--benchmarks benchmarks]

Writes `<out>/<date>-<gpu>.json` (everything) and `.md` (tables): device, versions, commit, the test
outcome, and for every benchmark its median time, GB/s and the other figures it put in `extra_info`.
It also runs (less usefully) on a CPU machine, where the GPU providers are skipped with their reasons.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def environment() -> dict:
    """Device name, versions and commit."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": _device_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": os.environ.get("AMFOR_COMMIT") or _git_commit(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    from amfor.ops import available_backends

    info["backends"] = available_backends("cuda" if torch.cuda.is_available() else "cpu")
    return info


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


def run_tests(path: str) -> dict:
    """pytest over `path`; the counts from its closing line and the names of failed tests."""
    proc = subprocess.run([sys.executable, "-m", "pytest", path, "-q", "-rfE", "-p", "no:cacheprovider"],
                          cwd=ROOT, capture_output=True, text=True)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = {word: int(num) for num, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed)", tail)}
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, flags=re.M)
    return {"exit_code": proc.returncode, "summary": tail, "counts": counts, "failed": failed,
            "log_tail": proc.stdout[-20000:] + proc.stderr[-5000:]}


def run_benchmarks(path: str) -> tuple[list[dict], dict]:
    """pytest-benchmark over `path`; one row per benchmark with its extra_info figures."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        proc = subprocess.run([sys.executable, "-m", "pytest", path, "-q", "-rs", "-p", "no:cacheprovider",
                               f"--benchmark-json={out}"], cwd=ROOT, capture_output=True, text=True)
        data = json.loads(out.read_text()) if out.exists() else {"benchmarks": []}
    rows = []
    for bench in data["benchmarks"]:
        row = {"name": bench["name"], "file": bench["fullname"].split("::")[0]}
        row.update(bench.get("extra_info", {}))
        row.setdefault("median_ms", bench["stats"]["median"] * 1e3)
        rows.append(row)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    skipped = re.findall(r"^SKIPPED \[\d+\] (.*)$", proc.stdout, flags=re.M)
    return rows, {"exit_code": proc.returncode, "summary": tail, "skipped": skipped}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown(report: dict) -> str:
    """The report as Markdown: environment, tests, then one table per benchmark file."""
    env = report["environment"]
    lines = [f"# amfor GPU report: {env['device']}", ""]
    lines += [f"- {key}: {_fmt(value)}" for key, value in env.items()]
    tests = report["tests"]
    lines += ["", "## Tests", "", f"`pytest tests`: {tests['summary']} (exit code {tests['exit_code']})"]
    lines += [f"- failed: {name}" for name in tests["failed"]]
    lines += ["", "## Benchmarks", "", f"`pytest benchmarks`: {report['bench_run']['summary']}"]
    by_file: dict[str, list[dict]] = {}
    for row in report["benchmarks"]:
        by_file.setdefault(row["file"], []).append(row)
    for file, rows in by_file.items():
        keys = [k for k in rows[0] if k not in ("file",)]
        for row in rows[1:]:
            keys += [k for k in row if k not in keys and k != "file"]
        lines += ["", f"### {file}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_fmt(row.get(k, "")) for k in keys) + " |" for row in rows]
    skipped = report["bench_run"]["skipped"]
    if skipped:
        lines += ["", "### Skipped providers", ""] + [f"- {s}" for s in skipped]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--tests", default="tests")
    parser.add_argument("--benchmarks", default="benchmarks")
    args = parser.parse_args(argv)
    report = {"environment": environment(), "tests": run_tests(args.tests)}
    report["benchmarks"], report["bench_run"] = run_benchmarks(args.benchmarks)
    device = re.sub(r"[^A-Za-z0-9]+", "-", report["environment"]["device"]).strip("-")
    stem = Path(args.out) / f"{datetime.date.today().isoformat()}-{device}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    stem.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {stem}.json and {stem}.md: tests {report['tests']['summary']}; "
          f"{len(report['benchmarks'])} benchmarks")
    return 0 if report["tests"]["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
