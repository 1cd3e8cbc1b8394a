"""Shared colour palettes and pattern fills of the synthetic dataset.

Clothing colours come from ONE shared palette, so colour combinations repeat across identities and
colour alone does not identify a person; patterns (stripes, checks, two-tone) add finer cues.
"""

from __future__ import annotations

import numpy as np

CLOTHES = np.array([
    (20, 20, 24), (235, 235, 230), (128, 128, 128), (30, 45, 110), (110, 160, 215), (180, 30, 35),
    (105, 25, 35), (40, 110, 55), (120, 120, 60), (220, 190, 50), (110, 70, 40), (200, 175, 140),
    (215, 120, 160), (95, 50, 130), (230, 120, 40), (60, 70, 75),
], dtype=np.float32)
HAIR = np.array([(15, 12, 10), (70, 45, 25), (150, 110, 60), (215, 190, 120), (150, 150, 150), (130, 50, 25)],
                dtype=np.float32)
SKIN = np.array([(240, 205, 180), (215, 170, 130), (170, 120, 85), (110, 75, 50)], dtype=np.float32)
BACKGROUND = np.array([
    (120, 120, 118), (90, 95, 100), (160, 150, 130), (70, 80, 60), (140, 110, 90), (100, 100, 140),
    (180, 180, 175), (60, 60, 65), (150, 130, 100), (90, 120, 130), (200, 170, 130), (110, 90, 100),
], dtype=np.float32)
VEHICLES = np.array([(200, 30, 30), (30, 60, 160), (230, 230, 230), (25, 25, 25), (150, 150, 155), (40, 100, 60)],
                    dtype=np.float32)
PATTERNS = ("solid", "solid", "hstripes", "vstripes", "checks", "twotone")


def pattern_fill(kind: str, c1: np.ndarray, c2: np.ndarray, period: int, shape: tuple[int, int],
                 origin: tuple[int, int], height: int) -> np.ndarray:
    """An [H, W, 3] float image of `kind` in colours c1/c2 anchored at `origin` (y, x).

    `period` is the stripe/check size in pixels; `height` the garment height for the two-tone split.
    """
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    yy, xx = yy - origin[0], xx - origin[1]
    if kind == "solid":
        sel = np.zeros((h, w), bool)
    elif kind == "hstripes":
        sel = (yy // period) % 2 == 1
    elif kind == "vstripes":
        sel = (xx // period) % 2 == 1
    elif kind == "checks":
        sel = ((yy // period) + (xx // period)) % 2 == 1
    elif kind == "twotone":
        sel = yy > height // 2
    else:
        raise ValueError(f"unknown pattern {kind!r}")
    return np.where(sel[..., None], c2, c1)
