"""Kill-and-resume: a run SIGKILLed mid-epoch and resumed ends bitwise equal to an uninterrupted one (CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from cli_runs import cli_env, load_weights, read_jsonl, run_cli, standin_overrides, without_timing

from amfor.engine.checkpoint import CheckpointError, load_checkpoint


def settings(root, out, **extra):
    # dropout draws from the RNG (restored), augmentation from per-sample seeds, checkpoints every 3 steps
    # of 4-step epochs: a mid-epoch position is what gets resumed
    return standin_overrides(root, **{"output": out, "model.kwargs.dropout": 0.2, "train.checkpoint_every": 3,
                                      "train.epochs": 4, "train.eval_every": 2, **extra})


def kill_mid_epoch(root, out, timeout: float = 240) -> dict:
    """Start a slowed-down run; SIGKILL it as soon as it has written a mid-epoch stage-2 checkpoint."""
    cmd = [sys.executable, "-m", "amfor.train", "--set", *settings(root, out, **{"model.kwargs.sleep": 0.4})]
    proc = subprocess.Popen(cmd, cwd=out.parent, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last, deadline = out / "checkpoints" / "last.pt", time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if last.exists():
                try:
                    t = load_checkpoint(last)["trainer"]
                except CheckpointError:
                    t = {"stage": 0}
                if t["stage"] == 2 and t["batch"] != 0:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return t
            time.sleep(0.02)
        raise AssertionError(f"no mid-epoch checkpoint before the run ended: {proc.stderr.read()[-3000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(tiny_root, tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run_cli(["-m", "amfor.train", "--set", *settings(tiny_root, ref)], tmp_path)
    at = kill_mid_epoch(tiny_root, cut)
    assert at["step"] < 16 and not (cut / "results.json").exists()
    run_cli(["-m", "amfor.train", "--resume", str(cut / "checkpoints" / "last.pt")], tmp_path)

    a, b = load_weights(ref / "checkpoints" / "last.pt"), load_weights(cut / "checkpoints" / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(load_weights(ref / "checkpoints" / "best.pt")["embed.weight"],
                       load_weights(cut / "checkpoints" / "best.pt")["embed.weight"])
    ra, rb = (without_timing(read_jsonl(d / "metrics.jsonl")) for d in (ref, cut))
    assert [r for r in ra if r["type"] != "budget"] == [r for r in rb if r["type"] != "budget"]
    assert (ref / "results.json").read_text() == (cut / "results.json").read_text()


@pytest.mark.slow
def test_resume_from_a_stage1_checkpoint(tiny_root, tmp_path):
    """A checkpoint taken inside stage 1 resumes there (features re-cached) and ends like the reference."""
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    common = {"train.keep_checkpoints": 100, "train.checkpoint_every": 0, "train.stage1_epochs": 3}
    run_cli(["-m", "amfor.train", "--set", *settings(tiny_root, ref, **common)], tmp_path)
    stage1 = sorted((ref / "checkpoints").glob("stage1_step*.pt"))
    assert stage1 and load_checkpoint(stage1[0])["trainer"]["step"] == 6
    run_cli(["-m", "amfor.train", "--resume", str(stage1[0]), "--output", str(cut)], tmp_path)
    a, b = load_weights(ref / "checkpoints" / "last.pt"), load_weights(cut / "checkpoints" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
