"""Helpers that lay out faithful FAKE copies of the ReID datasets (empty files with real-format names)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image


def touch(path: Path, real: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if real:
        Image.new("RGB", (8, 16), (120, 30, 200)).save(path)
    else:
        path.touch()
    return path


def market_name(pid: int, cam: int, k: int) -> str:
    return f"{pid:04d}_c{cam}s1_{k:06d}_01.jpg" if pid >= 0 else f"-1_c{cam}s1_{k:06d}_01.jpg"


def duke_name(pid: int, cam: int, k: int) -> str:
    return f"{pid:04d}_c{cam}_f{k:07d}.jpg" if pid >= 0 else f"-1_c{cam}_f{k:07d}.jpg"


def make_three_folders(ddir: Path, splits: dict[str, list[tuple[int, int]]], name_fn=market_name,
                       real: bool = False) -> None:
    """splits: folder -> [(pid, 1-based cam)], one file per entry."""
    k = 0
    for folder, items in splits.items():
        (ddir / folder).mkdir(parents=True, exist_ok=True)
        for pid, cam in items:
            k += 1
            path = ddir / folder / name_fn(pid, cam, k)
            if real:
                touch(path, real)
            else:
                open(path, "wb").close()


@pytest.fixture
def fake():
    """Namespace of the layout helpers, usable from any test in tests/data."""

    class Fake:
        pass

    ns = Fake()
    ns.touch, ns.market_name, ns.duke_name, ns.make_three_folders = touch, market_name, duke_name, make_three_folders
    return ns
