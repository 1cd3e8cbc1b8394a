"""The synthetic occluded dataset: determinism, caching, atomic writes, layout, exact masks, splits."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from amfor.data import build_dataset
from amfor.data.synthetic import ensure_generated, generate


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "synthetic.json":
            h.update(p.relative_to(folder).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    return root, build_dataset("synthetic", str(root), size="tiny", seed=0)


def test_deterministic_from_seed(tiny, tmp_path):
    root, _ = tiny
    again = ensure_generated(tmp_path, "tiny", 0)
    assert digest(again) == digest(root / "synthetic_tiny_seed0")
    other = ensure_generated(tmp_path, "tiny", 1)
    assert digest(other) != digest(again)


def test_cached_and_regenerated_when_parameters_differ(tmp_path):
    folder = ensure_generated(tmp_path, "tiny", 0)
    marker = folder / "synthetic.json"
    stamp = marker.stat().st_mtime_ns
    assert ensure_generated(tmp_path, "tiny", 0) == folder and marker.stat().st_mtime_ns == stamp
    ensure_generated(tmp_path, "tiny", 0, num_test_ids=6)
    params = json.loads(marker.read_text())["params"]
    assert params["num_test_ids"] == 6 and marker.stat().st_mtime_ns != stamp
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temp or stale folders left


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    import sys

    gen = sys.modules["amfor.data.synthetic.generate"]  # the module (the package re-exports a same-named function)
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gen, "render_job", boom)
    with pytest.raises(KeyboardInterrupt):
        ensure_generated(tmp_path, "tiny", 0)
    assert list(tmp_path.iterdir()) == []


def test_layout_names_and_splits(tiny):
    root, data = tiny
    ddir = root / "synthetic_tiny_seed0"
    for folder in ("bounding_box_train", "query", "bounding_box_test", "query_whole", "val_query", "val_gallery"):
        names = [p.name for p in (ddir / folder).iterdir()]
        assert names and all(len(n.split("_")) == 4 and n.split("_")[1].startswith("c") for n in names)
    assert data.num_train_pids == 8 and data.num_train_cams == 4
    q, w = sorted(Path(r.path).name for r in data.query), sorted(Path(r.path).name for r in data.extra["query_whole"])
    assert q == w
    train_raw = {int(Path(r.path).name[:4]) for r in data.train}
    test_ids = {r.pid for r in data.query} | {r.pid for r in data.gallery} - {0}
    val_ids = {r.pid for r in data.extra["val_query"]}
    assert not (train_raw & test_ids) and not (train_raw & val_ids) and not (val_ids & test_ids)
    assert 0 in {r.pid for r in data.gallery}  # distractors
    for rec in data.query:  # every query has a true match in another camera
        assert any(g.pid == rec.pid and g.camid != rec.camid for g in data.gallery)


def test_masks_exact_and_queries_occluded(tiny):
    _, data = tiny
    whole = {Path(r.path).name: r for r in data.extra["query_whole"]}
    fractions = []
    for rec in data.query:
        mask = np.asarray(Image.open(rec.mask_path))
        full = np.asarray(Image.open(whole[Path(rec.path).name].mask_path))
        assert mask.shape == (128, 64) and mask.max() <= 8 and set(np.unique(full)) >= {0, 1, 4}
        assert Image.open(rec.path).size == (64, 128)
        fractions.append(1 - (mask > 0).sum() / (full > 0).sum())
    assert 0.15 <= np.mean(fractions) <= 0.6 and min(fractions) > 0.05
    for rec in data.train:
        assert rec.mask_path is not None


def test_generate_stats_and_unknown_options(tmp_path):
    from amfor.data.synthetic import resolve_config

    marker = generate(tmp_path / "x", resolve_config("tiny"), seed=3)
    assert 0.2 <= marker["stats"]["query"]["mean_coverage"] <= 0.6
    with pytest.raises(TypeError, match="unknown synthetic option"):
        resolve_config("tiny", colour=3)
    with pytest.raises(ValueError, match="unknown synthetic size"):
        resolve_config("huge")
