"""Scene occluders drawn in front of the person: vehicles, poles, boxes, bushes and other people.

Each `draw_<kind>(size, rng)` returns an RGB layer [H, W, 3] and its coverage mask [H, W] bool.
Frame cuts (the person partly outside the image) are made by the scene renderer, not here.
"""

from __future__ import annotations

import numpy as np

from .identity import sample_identity
from .palette import VEHICLES
from .person import Canvas, Pose, draw_person, shape_mask

OCCLUDER_KINDS = ("car", "pole", "box", "bush", "person", "cut")


def _rect(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def draw_car(size, rng):
    h, w = size
    top = h * (1 - rng.uniform(0.25, 0.6))
    x0, x1 = w * rng.uniform(-0.6, 0.1), w * rng.uniform(0.9, 1.6)
    color = VEHICLES[rng.integers(len(VEHICLES))]
    layer = np.broadcast_to(color, (h, w, 3)).astype(np.float32).copy()
    body = shape_mask(size, [_rect(x0, top + 0.08 * h, x1, h + 1)], [(x0, top, x0 + 0.3 * w, top + 0.2 * h),
                                                                      (x1 - 0.3 * w, top, x1, top + 0.2 * h)])
    body |= shape_mask(size, [_rect(x0 + 0.12 * w, top, x1 - 0.12 * w, top + 0.1 * h)])
    window = shape_mask(size, [_rect(x0 + 0.15 * w, top + 0.03 * h, x1 - 0.15 * w, top + 0.12 * h)]) & body
    layer[window] = (40, 50, 60)
    for cx in (x0 + 0.2 * w, x1 - 0.2 * w):
        wheel = shape_mask(size, ellipses=[(cx - 0.12 * w, h - 0.09 * h, cx + 0.12 * w, h + 0.09 * h)])
        layer[wheel] = (15, 15, 15)
        body |= wheel
    return layer, body


def draw_pole(size, rng):
    h, w = size
    cx, half = w * rng.uniform(0.15, 0.85), w * rng.uniform(0.1, 0.25)
    color = np.array([(110, 110, 115), (90, 65, 40), (60, 60, 60)][rng.integers(3)], np.float32)
    xx = np.arange(w, dtype=np.float32)
    shade = 1.0 - 0.35 * np.abs((xx - cx) / max(half, 1.0)).clip(0, 1)
    layer = (color * shade[None, :, None]).repeat(h, 0)
    return layer, shape_mask(size, [_rect(cx - half, -1, cx + half, h + 1)])


def draw_box(size, rng):
    h, w = size
    bh, bw = h * rng.uniform(0.25, 0.55), w * rng.uniform(0.5, 1.0)
    x0 = -1 if rng.random() < 0.5 else w - bw
    color = np.array([(150, 110, 60), (120, 90, 50), (170, 160, 140), (70, 90, 120)][rng.integers(4)], np.float32)
    layer = np.broadcast_to(color, (h, w, 3)).astype(np.float32).copy()
    layer[(np.arange(h) % 6 == 0)] *= 0.7
    return layer, shape_mask(size, [_rect(x0, h - bh, x0 + bw, h + 1)])


def draw_bush(size, rng):
    h, w = size
    top = h * (1 - rng.uniform(0.3, 0.6))
    boxes = []
    for _ in range(int(rng.integers(5, 10))):
        cx, cy, r = w * rng.uniform(-0.1, 1.1), rng.uniform(top, h), w * rng.uniform(0.15, 0.35)
        boxes.append((cx - r, cy - r * 0.8, cx + r, cy + r * 0.8))
    mask = shape_mask(size, ellipses=boxes) & (np.arange(h)[:, None] >= top - 0.1 * h)
    mask[int(top + 0.15 * h):] |= True
    green = np.array((50, 110, 45), np.float32) * rng.uniform(0.6, 1.3)
    layer = green * (0.8 + 0.4 * rng.random((h, w, 1)))
    return layer.astype(np.float32), mask


def draw_other_person(size, rng):
    """Another (random, not in the dataset) person closer to the camera, offset to one side."""
    h, w = size
    canvas = Canvas(np.zeros((h, w, 3), np.float32))
    side = rng.choice([-1, 1])
    pose = Pose(cx=w / 2 + side * w * rng.uniform(0.35, 0.7), top=h * rng.uniform(-0.05, 0.2),
                body_h=h * rng.uniform(1.0, 1.3), view=str(rng.choice(["front", "back", "side"])),
                arm_swing=tuple(rng.uniform(-15, 15, 2)), stride=tuple(rng.uniform(-0.03, 0.03, 2)))
    draw_person(canvas, sample_identity(rng), pose)
    return canvas.rgb, canvas.label > 0


DRAWERS = {"car": draw_car, "pole": draw_pole, "box": draw_box, "bush": draw_bush, "person": draw_other_person}
