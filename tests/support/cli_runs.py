"""What the run-level tests share: stand-in run settings and a CLI runner with the stand-in importable.

The tiny synthetic dataset is the `tiny_root` fixture of tests/conftest.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def standin_overrides(root: Path, **extra) -> list[str]:
    """A short two-stage run of the stand-in on the tiny set: 4 stage-2 steps an epoch."""
    values = {"data.root": str(root), "data.size": "tiny", "data.num_workers": 1, "device": "cpu",
              "model.name": "standin_model:create_standin", "train.batch_size": 8, "train.stage1_epochs": 2,
              "train.epochs": 3, "train.max_minutes": 0, "train.eval_every": 1, "train.log_every": 1,
              "train.warmup_epochs": 1, "train.stage1_warmup_epochs": 1, "test.num_ranked": 0, **extra}
    return [f"{k}={v}" for k, v in values.items()]


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_cli(args: list[str], cwd: Path, timeout: float = 300, check: bool = True,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """`python <args>` in a subprocess of its own process group (`cli_env()` unless `env` is given: the stand-in
    importable); output captured (shown on failure). On timeout the whole group is killed, workers included."""
    proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env=cli_env() if env is None else env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: torchrun's workers too
        out, err = proc.communicate()
        raise AssertionError(f"{args} timed out after {timeout} s:\n{out[-3000:]}\n{err[-5000:]}") from None
    proc = subprocess.CompletedProcess(args, proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_jsonl(path: Path, kind: str | None = None) -> list[dict]:
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("type") == kind]


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("img_s", "step_s", "remaining_s")} for r in records]


def load_weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]
