"""Drawing one person (RGB + exact part labels) with PIL polygons and ellipses.

Part ids (image-space sides: "left" = the image's left half of the body, so a horizontal flip swaps
the pairs 2<->3, 5<->6, 7<->8): 0 background, 1 head (hair, face, neck), 2 left arm, 3 right arm,
4 torso, 5 left leg, 6 right leg, 7 left foot, 8 right foot. Carried bags are drawn on the RGB image
only: they do not change the body labels underneath and are background elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .identity import Identity
from .palette import pattern_fill


@dataclass(frozen=True)
class Pose:
    """Per-image placement: centre x, top y and body height in pixels, view and limb angles."""

    cx: float
    top: float
    body_h: float
    view: str                # front | back | side
    arm_swing: tuple[float, float]
    stride: tuple[float, float]


class Canvas:
    """An RGB float image plus a uint8 label map that parts are painted into in drawing order."""

    def __init__(self, rgb: np.ndarray) -> None:
        self.rgb = rgb
        self.label = np.zeros(rgb.shape[:2], np.uint8)
        self.painted = np.zeros(rgb.shape[:2], bool)

    def paint(self, shape_mask: np.ndarray, color: np.ndarray, label: int | None) -> None:
        """Paint `color` ([3] or [H, W, 3]) where `shape_mask`; set `label` there unless None."""
        self.rgb[shape_mask] = color[shape_mask] if color.ndim == 3 else color
        self.painted |= shape_mask
        if label is not None:
            self.label[shape_mask] = label


def shape_mask(size: tuple[int, int], polygons=(), ellipses=()) -> np.ndarray:
    """Boolean [H, W] mask of the union of `polygons` (point lists) and `ellipses` (x0, y0, x1, y1)."""
    img = Image.new("L", (size[1], size[0]), 0)
    draw = ImageDraw.Draw(img)
    for poly in polygons:
        draw.polygon([tuple(p) for p in poly], fill=255)
    for box in ellipses:
        draw.ellipse(box, fill=255)
    return np.asarray(img) > 0


def limb(p0: tuple[float, float], p1: tuple[float, float], w0: float, w1: float) -> list[tuple[float, float]]:
    """Quad of a limb from p0 to p1 with half-widths w0 at p0 and w1 at p1."""
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    n = math.hypot(dx, dy) or 1.0
    nx, ny = -dy / n, dx / n
    return [(p0[0] + nx * w0, p0[1] + ny * w0), (p1[0] + nx * w1, p1[1] + ny * w1),
            (p1[0] - nx * w1, p1[1] - ny * w1), (p0[0] - nx * w0, p0[1] - ny * w0)]


def _lerp(p0, p1, t):
    return (p0[0] + (p1[0] - p0[0]) * t, p0[1] + (p1[1] - p0[1]) * t)


def _garment(canvas: Canvas, mask: np.ndarray, ident: Identity, upper: bool, label: int) -> None:
    """Paint a garment region with the identity's top or bottom pattern."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return
    if upper:
        kind, c1, c2, period = ident.top_pattern, ident.top, ident.top2, ident.top_period
    else:
        kind, c1, c2, period = ident.bottom_pattern, ident.bottom, ident.top2, 3
    fill = pattern_fill(kind, c1, c2, period, mask.shape, (int(ys.min()), int(xs.min())), int(np.ptp(ys)) + 1)
    canvas.paint(mask, fill, label)


def _draw_leg(canvas: Canvas, ident: Identity, hip, ankle, hw: float, label: int) -> None:
    size = canvas.label.shape
    knee = _lerp(hip, ankle, 0.4 if ident.bottom_kind == "shorts" else 1.0)
    _garment(canvas, shape_mask(size, [limb(hip, knee, hw, hw * 0.85)]), ident, upper=False, label=label)
    if ident.bottom_kind == "shorts":
        canvas.paint(shape_mask(size, [limb(knee, ankle, hw * 0.7, hw * 0.6)]), ident.skin, label)


def _draw_arm(canvas: Canvas, ident: Identity, shoulder, hand, hw: float, label: int) -> None:
    size = canvas.label.shape
    elbow = _lerp(shoulder, hand, 1.0 if ident.sleeves == "long" else 0.45)
    _garment(canvas, shape_mask(size, [limb(shoulder, elbow, hw, hw * 0.85)]), ident, upper=True, label=label)
    if ident.sleeves == "short":
        canvas.paint(shape_mask(size, [limb(elbow, hand, hw * 0.75, hw * 0.7)]), ident.skin, label)
    r = hw * 0.9
    canvas.paint(shape_mask(size, ellipses=[(hand[0] - r, hand[1] - r, hand[0] + r, hand[1] + r)]), ident.skin, label)


def _skeleton(ident: Identity, pose: Pose) -> dict:
    """Key points and half-widths (pixels) of the body for `pose`."""
    h, cx, top = pose.body_h * ident.height, pose.cx, pose.top
    side = pose.view == "side"
    bw = ident.width * (0.6 if side else 1.0)
    sh_y, hip_y, ankle_y = top + 0.175 * h, top + 0.5 * h, top + 0.93 * h
    sw, hw = 0.12 * h * bw, 0.095 * h * bw
    arm_len, arms, legs = 0.34 * h, [], []
    for k, s in enumerate((-1, 1)):
        shoulder = (cx + s * (sw - 0.025 * h), sh_y + 0.012 * h)
        ang = math.radians(8 + pose.arm_swing[k]) if not side else math.radians(pose.arm_swing[k] * 2)
        arms.append((shoulder, (shoulder[0] + s * math.sin(ang) * arm_len, shoulder[1] + math.cos(ang) * arm_len)))
        hip = (cx + s * 0.05 * h * bw, hip_y - 0.02 * h)
        spread = (0.055 * h if not side else 0.0) + pose.stride[k] * h
        legs.append((hip, (cx + s * spread, ankle_y)))
    return dict(h=h, cx=cx, top=top, sh_y=sh_y, hip_y=hip_y, sw=sw, hw=hw, arms=arms, legs=legs, side=side)


def _draw_head(canvas: Canvas, ident: Identity, sk: dict, view: str) -> None:
    size, h, cx, top = canvas.label.shape, sk["h"], sk["cx"], sk["top"]
    rx, ry = 0.055 * h * ident.head, 0.07 * h * ident.head
    cy = top + ry
    neck = [(cx - 0.022 * h, cy + ry * 0.6), (cx + 0.022 * h, cy + ry * 0.6), (cx + 0.022 * h, sk["sh_y"] + 2),
            (cx - 0.022 * h, sk["sh_y"] + 2)]
    canvas.paint(shape_mask(size, [neck]), ident.skin, 1)
    if ident.hair_style == "long":
        long = [(cx - rx * 1.05, cy), (cx + rx * 1.05, cy), (cx + rx * 1.1, sk["sh_y"] + 0.04 * h),
                (cx - rx * 1.1, sk["sh_y"] + 0.04 * h)]
        canvas.paint(shape_mask(size, [long]), ident.hair, 1)
    face = ident.hair if view == "back" and ident.hair_style != "bald" else ident.skin
    canvas.paint(shape_mask(size, ellipses=[(cx - rx, cy - ry, cx + rx, cy + ry)]), face, 1)
    if ident.hair_style in ("short", "long"):
        cap = shape_mask(size, ellipses=[(cx - rx * 1.05, cy - ry * 1.08, cx + rx * 1.05, cy + ry * 0.2)])
        canvas.paint(cap, ident.hair, 1)
    elif ident.hair_style == "cap":
        crown = shape_mask(size, ellipses=[(cx - rx * 1.1, cy - ry * 1.15, cx + rx * 1.1, cy - ry * 0.05)])
        brim = shape_mask(size, [[(cx - rx * 1.4, cy - ry * 0.35), (cx + rx * 1.4, cy - ry * 0.35),
                                  (cx + rx * 1.4, cy - ry * 0.15), (cx - rx * 1.4, cy - ry * 0.15)]])
        canvas.paint(crown | brim, ident.cap, 1)


def _draw_bag(canvas: Canvas, ident: Identity, sk: dict, view: str, front_layer: bool) -> None:
    """Backpack (over the torso from behind, straps from the front) or a handbag at one hand."""
    size, h, cx = canvas.label.shape, sk["h"], sk["cx"]
    if ident.bag == "backpack" and front_layer:
        if view == "back":
            w, y0, y1 = sk["sw"] * 0.8, sk["sh_y"] + 0.02 * h, sk["hip_y"] - 0.04 * h
            canvas.paint(shape_mask(size, [[(cx - w, y0), (cx + w, y0), (cx + w, y1), (cx - w, y1)]]),
                         ident.bag_color, None)
        elif view == "front":
            for s in (-1, 1):
                x = cx + s * sk["sw"] * 0.55
                end = (x + s * 0.01 * h, sk["hip_y"] - 0.1 * h)
                strap = limb((x, sk["sh_y"]), end, 0.012 * h + 0.5, 0.5 + 0.01 * h)
                canvas.paint(shape_mask(size, [strap]), ident.bag_color, None)
        else:
            x0 = cx - ident.bag_side * sk["sw"] * 0.7
            y0, y1 = sk["sh_y"] + 0.02 * h, sk["hip_y"] - 0.05 * h
            box = [(x0 - 0.07 * h, y0), (x0 + 0.07 * h, y0), (x0 + 0.07 * h, y1), (x0 - 0.07 * h, y1)]
            canvas.paint(shape_mask(size, [box]), ident.bag_color, None)
    elif ident.bag == "handbag" and front_layer:
        k = 0 if ident.bag_side < 0 else 1
        hx, hy = sk["arms"][k][1]
        box = [(hx - 0.06 * h, hy - 0.02 * h), (hx + 0.06 * h, hy - 0.02 * h), (hx + 0.07 * h, hy + 0.12 * h),
               (hx - 0.07 * h, hy + 0.12 * h)]
        canvas.paint(shape_mask(size, [box]), ident.bag_color, None)


def draw_person(canvas: Canvas, ident: Identity, pose: Pose) -> None:
    """Paint `ident` in `pose` onto `canvas` (RGB and part labels), back to front."""
    sk, size, h = _skeleton(ident, pose), canvas.label.shape, pose.body_h * ident.height
    order = (1, 0) if sk["side"] else (0, 1)
    if sk["side"]:  # far arm behind the body
        _draw_arm(canvas, ident, *sk["arms"][order[0]], 0.028 * h, 2 + order[0])
    for k in order:
        hip, ankle = sk["legs"][k]
        _draw_leg(canvas, ident, hip, ankle, 0.04 * h * ident.width ** 0.5, 5 + k)
        fx = ankle[0] + (0.02 * h if sk["side"] else (-1, 1)[k] * 0.01 * h)
        foot = (fx - 0.04 * h, ankle[1] - 0.005 * h, fx + 0.04 * h, ankle[1] + 0.055 * h)
        canvas.paint(shape_mask(size, ellipses=[foot]), ident.shoes, 7 + k)
    cx, sh_y, hip_y, sw, hw = sk["cx"], sk["sh_y"], sk["hip_y"], sk["sw"], sk["hw"]
    torso = [(cx - sw, sh_y), (cx + sw, sh_y), (cx + hw, hip_y), (cx - hw, hip_y)]
    _garment(canvas, shape_mask(size, [torso]), ident, upper=True, label=4)
    for k in ((order[1],) if sk["side"] else (0, 1)):
        _draw_arm(canvas, ident, *sk["arms"][k], 0.028 * h, 2 + k)
    _draw_head(canvas, ident, sk, pose.view)
    _draw_bag(canvas, ident, sk, pose.view, front_layer=True)
