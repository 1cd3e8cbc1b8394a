"""A user's own data through the command line: `python -m amfor.train` on a `<split>/<pid>/<image>` folder with ONE
training camera (query camera 0, gallery camera 1, never seen in training) trains and tests end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.slow


def person_folders(root: Path, seed: int = 0) -> None:
    """train/<pid>/, query/<pid>/, gallery/<pid>/ with small JPEG and PNG images, one colour scheme per identity."""
    rng = np.random.default_rng(seed)
    layout = {"train": {pid: 4 for pid in (11, 12, 13, 14)}, "query": {21: 1, 22: 1, 23: 1},
              "gallery": {21: 2, 22: 2, 23: 2, 24: 1}}
    for split, pids in layout.items():
        for pid, count in pids.items():
            colour = rng.integers(0, 256, 3)
            for k in range(count):
                pixels = np.clip(colour + rng.normal(0, 20, (48, 24, 3)), 0, 255).astype(np.uint8)
                folder = root / split / str(pid)
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(folder / (f"{k}.jpg" if k % 2 == 0 else f"{k}.png"))


def test_a_pid_folder_dataset_with_one_training_camera_trains_and_tests(tmp_path):
    person_folders(tmp_path / "mydata")
    args = ["amfor.train", "--data-root", str(tmp_path / "mydata"), "--output", str(tmp_path / "run"), "--device",
            "cpu", "--set", "data.name=custom", "data.num_workers=0", "train.batch_size=8", "train.max_steps=2",
            "train.max_minutes=0", "train.log_every=1", "test.num_ranked=0"]
    proc = subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"amfor.train failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["query"]["num_valid_queries"] == 3 and 0 < results["query"]["mAP"] <= 1
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["num_cameras"] == 2  # train and query camera 0, gallery camera 1
    assert state["model"]["cameras_seen"].tolist() == [True, False]
