"""The command line end to end with the real tiny model: `amfor.train` (both stages, a few steps on the tiny
synthetic set), then `amfor.test` and `amfor.export` on the checkpoint it wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import amfor
from amfor.config import DEMO_SWITCHES, build_config

pytestmark = pytest.mark.slow


def run(args: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """python -m amfor.train on the tiny set with every component on (the demo's default leaves some off): 1
    stage-1 epoch, 2 stage-2 steps, validation, test."""
    if not hasattr(amfor, "create_model"):
        pytest.skip("amfor.create_model is not there yet")
    work = tmp_path_factory.mktemp("cli")
    run(["amfor.train", "--data-root", str(work / "data"), "--output", str(work / "run"), "--device", "cpu", "--set",
         "data.size=tiny", "data.num_workers=1", "train.batch_size=8", "train.stage1_epochs=1", "train.max_steps=2",
         "train.max_minutes=0", "train.eval_every=1", "train.log_every=1", "test.num_ranked=2",
         *[f"model.kwargs.{k}=true" for k in DEMO_SWITCHES]], work)
    return work / "run"


def test_train_writes_a_loadable_checkpoint_metrics_and_pictures(tiny_run):
    state = torch.load(tiny_run / "checkpoints" / "last.pt", weights_only=True)
    assert state["model_name"] == "amfor_vit_tiny_patch16" and state["stage1_finished"]
    assert (state["trainer"]["stage"], state["trainer"]["step"]) == (2, 2)
    kwargs = build_config(tiny_run / "config.yaml").model.kwargs  # the run's switches
    model = amfor.create_model("amfor_vit_tiny_patch16", state["num_classes"], num_cameras=state["num_cameras"],
                               **kwargs)
    model.finish_stage1()
    model.load_state_dict(state["model"])  # strict
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert {r["stage"] for r in train} == {1, 2} and all("loss" in r and r["loss"] == r["loss"] for r in train)
    assert any(k.startswith("loss_") for k in train[-1])
    assert [r["type"] for r in records].count("eval") >= 1 and records[-1]["type"] == "test"
    for name in ("config.yaml", "results.json", "cmc.png", "ranked_query.png", "ranked_query_whole.png"):
        assert (tiny_run / name).stat().st_size > 0


def test_test_command_reproduces_the_end_of_training(tiny_run):
    out = tiny_run.parent / "test-out"
    proc = run(["amfor.test", "--checkpoint", str(tiny_run / "checkpoints" / "best.pt"), "--output", str(out)],
               tiny_run.parent)
    assert "query_whole" in proc.stdout and "mAP" in proc.stdout
    trained = json.loads((tiny_run / "results.json").read_text())
    tested = json.loads((out / "results.json").read_text())
    for split in ("query", "query_whole"):
        for k in ("mAP", "R1", "R5", "R10", "mINP"):
            assert tested[split][k] == pytest.approx(trained[split][k], abs=1e-9), (split, k)
    assert (out / "cmc.png").exists()


@pytest.mark.parametrize("fmt, suffix", [("onnx", ".onnx"), ("torch-export", ".pt2")])
def test_export_through_the_reference_ops(tiny_run, fmt, suffix):
    if fmt == "onnx":
        pytest.importorskip("onnx")
        pytest.importorskip("onnxscript")
    target = tiny_run.parent / f"model{suffix}"
    run(["amfor.export", "--checkpoint", str(tiny_run / "checkpoints" / "last.pt"), "--format", fmt, "--output",
         str(target)], tiny_run.parent)
    spec = json.loads(Path(str(target) + ".json").read_text())
    assert list(spec["inputs"]) == ["images", "camids"] and spec["inputs"]["images"]["shape"] == ["B", 3, 128, 64]
    feats, vis = spec["outputs"]["features"]["shape"], spec["outputs"]["visibility"]["shape"]
    assert feats[0] == vis[0] == "B" and feats[1] == vis[1] == 9  # global + 8 parts
    if fmt == "torch-export" or spec["parity_max_abs_error"] is not None:
        assert spec["parity_max_abs_error"] < 1e-4
