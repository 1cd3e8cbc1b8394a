"""scripts/gpu_check.sh and scripts/gpu_wheels.sh without a GPU: the one call we would make on a lent GPU machine.

- the whole script, as it would run there (`--quick`), on this CPU machine: it installs a wheel from the wheel
  folder, writes the report, and says phase by phase that it skipped for want of a GPU;
- the budgets: each phase is ended when its budget is spent (its whole process group) and no phase runs past the
  deadline, so `--quick` fits 7 minutes by construction;
- gpu_wheels.sh: one pinned wheel of each package into the folder, a bad request leaves the folder as it was.
Wheels are built here (a zip with its dist-info), never downloaded.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from benchmarks import gpu_report

ROOT = Path(__file__).resolve().parents[1]
PROBE = "amfor_probe_pkg"  # a distribution no machine has


def make_wheel(folder: Path, name: str, version: str) -> Path:
    """A pure-Python wheel of `name` (one module, `VERSION = version`), as pip builds them."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": f"VERSION = {version!r}\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for file, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{file},sha256={digest},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join([*record, f"{info}/RECORD,,"]) + "\n"
    with zipfile.ZipFile(path, "w") as zf:
        for file, text in files.items():
            zf.writestr(file, text)
    return path


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "CUDA_HOME", "PYTHONPATH")}
    return {**env, "CUDA_VISIBLE_DEVICES": "", **extra}


@pytest.mark.slow  # about 20 s: bash, pip, and the report's start (torch, amfor)
def test_quick_without_a_gpu_installs_the_wheels_and_reports_every_phase_skipped(tmp_path):
    wheels, out = tmp_path / "whl", tmp_path / "out"
    make_wheel(wheels, PROBE, "1.0")
    make_wheel(wheels, "pytest", "0.0.1")  # installed here already: left alone
    out.mkdir()
    env = _env(AMFOR_GPU_WHEEL_DIR=str(wheels), AMFOR_GPU_SITE=str(tmp_path / "site"),
               AMFOR_GPU_WORKDIR=str(tmp_path / "work"), AMFOR_GPU_RESULTS=str(tmp_path / "results"), OUT=str(out))
    start = time.time()
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--quick"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=gpu_report.QUICK_TOTAL_S + 30)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # nothing was tested on a GPU
    reports = sorted((tmp_path / "results").glob("*-quick.json"))
    assert len(reports) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(reports[0].read_text())
    assert list(report["phases"]) == list(gpu_report.PHASES)
    for name, phase in report["phases"].items():
        assert phase["state"] == "skipped" and "no CUDA device" in phase["reason"], (name, phase)
        assert f"{name}: skipped: no CUDA device" in proc.stdout
    assert report["verdict"].startswith("nothing ran: no CUDA device")
    assert datetime.datetime.fromisoformat(report["deadline"]).timestamp() - start <= gpu_report.QUICK_TOTAL_S + 1
    setup = "\n".join(report["setup"])
    assert f"1 installed from {wheels}" in setup and f"{PROBE}-1.0" in setup
    assert "already installed here, left as they are: pytest==" in setup
    assert f"is on sys.path, with {PROBE}==1.0" in setup
    assert (tmp_path / "site" / PROBE / "__init__.py").exists()
    md = reports[0].with_suffix(".md").read_text()
    for name in gpu_report.PHASES:
        assert f"| {name} | {gpu_report.QUICK_BUDGETS.get(name, 'None')} | skipped |" in md
    assert (out / reports[0].name).read_text() == reports[0].read_text()  # $OUT has the report and the logs
    assert (out / "logs" / "setup.log").read_text().strip().splitlines() == report["setup"]


def test_quick_budgets_fit_seven_minutes():
    """The fixed budgets, the start-up and a reserve add up to QUICK_TOTAL_S at most, which with the grace of the
    backstop's kill is under 7 minutes; the report's phases come in the order of their value."""
    fixed = sum(gpu_report.QUICK_BUDGETS.values())
    assert gpu_report.SETUP_S + fixed + gpu_report.RESERVE_S <= gpu_report.QUICK_TOTAL_S
    assert gpu_report.QUICK_TOTAL_S + 2 * gpu_report.GRACE_S <= 7 * 60
    assert gpu_report.PHASES[:3] == ("build", "ops", "train_tiny") and gpu_report.PHASES[-1] == "rest"
    assert set(gpu_report.QUICK_BUDGETS) == set(gpu_report.PHASES) - {"rest"}  # rest: what the others leave


def _sleeper(ctx, budget, name, pids: Path) -> dict:
    """A phase that would run for a minute, in a child that starts a grandchild: both must be ended."""
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
            "time.sleep(60)']); open(sys.argv[1], 'a').write(f'{p.pid}\\n'); time.sleep(60)")
    run = gpu_report.run_command([sys.executable, "-c", code, str(pids)], budget, ctx.workdir / f"{name}.log")
    run["state"] = "timed out" if run["timed_out"] else "passed"
    return run


def _alive(pid: int) -> bool:
    """A process that runs (a zombie, ended but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_a_phase_is_ended_at_its_budget_and_no_phase_runs_past_the_deadline(tmp_path, monkeypatch):
    pids = tmp_path / "pids"
    monkeypatch.setattr(gpu_report, "GRACE_S", 1)
    monkeypatch.setattr(gpu_report, "RESERVE_S", 1)
    monkeypatch.setattr(gpu_report, "MIN_PHASE_S", 2)
    monkeypatch.setattr(gpu_report, "environment", lambda with_amfor=True: {"device": "test"})
    monkeypatch.setattr(gpu_report, "RUNNERS", {name: (lambda ctx, budget, name=name: _sleeper(ctx, budget, name,
                                                                                             pids))
                                                for name in gpu_report.PHASES})
    limits = {name: 3 for name in gpu_report.PHASES}
    report = {"environment": {"device": "test"}, "phases": {}}
    stem = tmp_path / "results" / "report"
    start = time.time()
    gpu_report.run_phases(report, stem, gpu_report.Context(True, tmp_path), limits, deadline=start + 8, gpu=True)
    elapsed = time.time() - start
    states = {name: p["state"] for name, p in report["phases"].items()}
    assert states["build"] == "timed out" and states["ops"] == "timed out", states
    assert states["rest"] == "not reached" and "total time budget" in report["phases"]["rest"]["reason"]
    assert elapsed <= 8, elapsed  # the deadline held, whatever the phases' own budgets said
    assert all(p.get("seconds", 0) <= 3.5 for p in report["phases"].values()), report["phases"]
    time.sleep(0.5)
    grandchildren = [int(pid) for pid in pids.read_text().split()]
    assert grandchildren and not any(map(_alive, grandchildren))  # ended with their group
    written = json.loads(stem.with_suffix(".json").read_text())
    assert written["phases"] == json.loads(json.dumps(report["phases"]))
    status, verdict = gpu_report.verdict(report)
    assert status == 1 and verdict.startswith("FAILED: build timed out, ops timed out")


def _wheels(tmp_path: Path, specs: str, folder: Path) -> subprocess.CompletedProcess:
    env = _env(AMFOR_GPU_WHEELS=specs, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(tmp_path / "links"),
               TMPDIR=str(tmp_path))
    return subprocess.run(["bash", "scripts/gpu_wheels.sh", str(folder)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_gpu_wheels_fetches_one_pinned_wheel_of_each_and_a_bad_request_changes_nothing(tmp_path):
    make_wheel(tmp_path / "links", PROBE, "1.0")
    make_wheel(tmp_path / "links", PROBE, "2.0")
    folder = tmp_path / "whl"
    proc = _wheels(tmp_path, f"{PROBE}==1.0", folder)
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in folder.iterdir()] == [f"{PROBE}-1.0-py3-none-any.whl"]
    for specs, message in ((f"{PROBE}==3.0", f"no wheel of {PROBE}==3.0 could be downloaded or built"),
                           (PROBE, f"'{PROBE}' is not name==version")):
        proc = _wheels(tmp_path, specs, folder)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert [p.name for p in folder.iterdir()] == [f"{PROBE}-1.0-py3-none-any.whl"]  # as it was
    assert not list(tmp_path.glob("amfor-wheels.*"))  # no temporary folder left behind
