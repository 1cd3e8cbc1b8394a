"""One synthetic image: scene sampling (pose, view, scale), occluder choice with coverage control, rendering."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from .camera import CameraStyle, apply_camera, render_background
from .identity import Identity
from .occluders import DRAWERS, OCCLUDER_KINDS
from .person import Canvas, Pose, draw_person

OCCLUDER_WEIGHTS = np.array([0.2, 0.13, 0.15, 0.15, 0.22, 0.15])


@dataclass(frozen=True)
class Scene:
    """Everything one image depends on except the occluder (so the whole-body copy matches exactly)."""

    ident: Identity
    cam: CameraStyle
    pose: Pose
    seed: int  # background texture offset and sensor noise


@dataclass(frozen=True)
class Occluder:
    kind: str
    seed: int
    shift: tuple[float, float] = (0.0, 0.0)  # frame cut: person moved by (dx, dy) in body heights


def sample_scene(ident: Identity, cam: CameraStyle, size: tuple[int, int], rng: np.random.Generator) -> Scene:
    """View, pose and scale jitter; the person stays fully inside the frame."""
    h, w = size
    body_h = h * rng.uniform(0.8, 0.94)
    eff = body_h * ident.height
    pose = Pose(cx=w / 2 + w * rng.uniform(-0.08, 0.08), top=rng.uniform(0.01 * h, max(0.011 * h, 0.985 * h - eff)),
                body_h=body_h, view=str(rng.choice(["front", "front", "back", "back", "side"])),
                arm_swing=tuple(float(a) for a in rng.uniform(-12, 12, 2)),
                stride=tuple(float(s) for s in rng.uniform(-0.04, 0.04, 2)))
    return Scene(ident, cam, pose, int(rng.integers(2**31)))


def render(scene: Scene, size: tuple[int, int], occluder: Occluder | None = None) -> tuple[Image.Image, np.ndarray]:
    """(RGB image, part labels [H, W] uint8) of `scene`, occluded by `occluder` when given."""
    rng = np.random.default_rng(scene.seed)
    canvas = Canvas(render_background(scene.cam, size, rng))
    pose = scene.pose
    if occluder is not None and occluder.kind == "cut":
        dx, dy = occluder.shift
        pose = replace(pose, cx=pose.cx + dx * pose.body_h, top=pose.top + dy * pose.body_h)
    draw_person(canvas, scene.ident, pose)
    if occluder is not None and occluder.kind != "cut":
        layer, occ = DRAWERS[occluder.kind](size, np.random.default_rng(occluder.seed))
        canvas.rgb[occ] = layer[occ]
        canvas.label[occ] = 0
    return apply_camera(canvas.rgb, scene.cam, rng), canvas.label


def sample_occluder(rng: np.random.Generator) -> Occluder:
    kind = str(rng.choice(OCCLUDER_KINDS, p=OCCLUDER_WEIGHTS / OCCLUDER_WEIGHTS.sum()))
    shift = (0.0, 0.0)
    if kind == "cut":
        amount = rng.uniform(0.25, 0.65)
        shift = (0.0, amount) if rng.random() < 0.75 else (float(rng.choice([-1, 1])) * amount * 0.45, 0.0)
    return Occluder(kind, int(rng.integers(2**31)), shift)


def choose_occluder(scene: Scene, size: tuple[int, int], rng: np.random.Generator,
                    coverage: tuple[float, float] = (0.2, 0.6), tries: int = 12) -> tuple[Occluder, float]:
    """Sample occluders until one covers a body fraction within `coverage` (else the closest one)."""
    body = _body_mask(scene, size, scene.pose)
    best, best_err, best_cov = None, np.inf, 0.0
    for _ in range(tries):
        occ = sample_occluder(rng)
        if occ.kind == "cut":
            dx, dy = occ.shift
            shifted = replace(scene.pose, cx=scene.pose.cx + dx * scene.pose.body_h,
                              top=scene.pose.top + dy * scene.pose.body_h)
            visible = int(_body_mask(scene, size, shifted).sum())
        else:
            visible = int((body & ~DRAWERS[occ.kind](size, np.random.default_rng(occ.seed))[1]).sum())
        cov = 1.0 - visible / max(int(body.sum()), 1)
        err = max(coverage[0] - cov, cov - coverage[1], 0.0)
        if err < best_err:
            best, best_err, best_cov = occ, err, cov
        if err == 0.0:
            break
    return best, best_cov


def _body_mask(scene: Scene, size: tuple[int, int], pose: Pose) -> np.ndarray:
    """Body pixels (label > 0) of the person alone in `pose`, without background or camera pass."""
    canvas = Canvas(np.zeros((*size, 3), np.float32))
    draw_person(canvas, scene.ident, pose)
    return canvas.label > 0
