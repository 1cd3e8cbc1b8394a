"""Ranked-list and CMC pictures are valid PNGs of the expected size."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from amfor.data import ImageRecord
from amfor.evaluation import plot_cmc, ranked_lists


def make_records(tmp_path, pids, cams, prefix):
    out = []
    for k, (pid, cam) in enumerate(zip(pids, cams, strict=True)):
        path = tmp_path / f"{prefix}{k}.png"
        Image.new("RGB", (32, 64), tuple(int(c) for c in np.random.default_rng(k).integers(0, 255, 3))).save(path)
        out.append(ImageRecord(str(path), pid, cam))
    return out


def test_ranked_lists_png(tmp_path):
    query = make_records(tmp_path, [1, 2, 3], [0, 0, 0], "q")
    gallery = make_records(tmp_path, [1, 2, 3, 1, 2, 3, 4], [1, 1, 1, 0, 2, 2, 2], "g")
    dist = np.random.default_rng(0).random((3, 7))
    out = ranked_lists(dist, query, gallery, tmp_path / "ranks.png", topk=5, worst_first=True, image_size=(64, 32))
    img = Image.open(out)
    img.verify()
    tile_h, tile_w = 64 + 8, 32 + 8
    assert Image.open(out).size == (2 + tile_w * 6 + 12, tile_h * 3)
    with pytest.raises(ValueError, match="distmat"):
        ranked_lists(dist[:2], query, gallery, tmp_path / "x.png")


def test_cmc_png(tmp_path):
    out = plot_cmc({"occluded": np.linspace(0.3, 0.9, 50), "whole": np.linspace(0.6, 1.0, 50)}, tmp_path / "cmc.png")
    Image.open(out).verify()
    assert Image.open(out).size == (500, 400)


def test_import_leaves_the_matplotlib_backend_alone():
    """Importing amfor.evaluation and drawing must not switch the caller's backend (a fresh interpreter)."""
    import subprocess
    import sys

    code = ("import matplotlib; matplotlib.use('svg'); import amfor.evaluation as e, numpy as np, tempfile, os; "
            "d = tempfile.mkdtemp(); e.plot_cmc(np.linspace(0.5, 1, 10), os.path.join(d, 'c.png')); "
            "print(matplotlib.get_backend())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().lower() == "svg"
