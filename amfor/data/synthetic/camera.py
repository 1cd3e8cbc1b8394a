"""Per-camera look: background texture, lighting, colour cast, blur and sensor noise."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from .palette import BACKGROUND

BACKGROUND_KINDS = ("wall_floor", "bricks", "fence", "tiles", "mottled")


@dataclass(frozen=True)
class CameraStyle:
    """Fixed properties of one camera."""

    kind: str
    color1: np.ndarray
    color2: np.ndarray
    horizon: float        # fraction of the height where the floor starts
    period: int           # texture period in pixels
    gain: float           # global brightness
    cast: np.ndarray      # per-channel multipliers
    blur: float           # Gaussian blur radius in pixels
    noise: float          # noise std in 0..255 units


def sample_camera(rng: np.random.Generator, index: int) -> CameraStyle:
    """Camera `index` gets a distinct background kind (cycling) and random colours and optics."""
    c1, c2 = BACKGROUND[rng.choice(len(BACKGROUND), 2, replace=False)]
    return CameraStyle(kind=BACKGROUND_KINDS[index % len(BACKGROUND_KINDS)], color1=c1, color2=c2,
                       horizon=float(rng.uniform(0.45, 0.8)), period=int(rng.integers(4, 12)),
                       gain=float(rng.uniform(0.65, 1.25)), cast=rng.uniform(0.75, 1.25, 3).astype(np.float32),
                       blur=float(rng.uniform(0.0, 1.1)), noise=float(rng.uniform(2.0, 9.0)))


def render_background(cam: CameraStyle, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """[H, W, 3] float background of camera `cam`, with a random texture offset per image."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    xx = xx + int(rng.integers(0, 64))
    p = cam.period
    horizon = int(h * (cam.horizon + rng.uniform(-0.05, 0.05)))
    if cam.kind == "wall_floor":
        sel = yy >= horizon
    elif cam.kind == "bricks":
        sel = ((yy % p) == 0) | (((xx + (yy // p % 2) * p) % (2 * p)) == 0)
    elif cam.kind == "fence":
        sel = ((xx // p) % 3 == 0) & (yy < horizon)
    elif cam.kind == "tiles":
        sel = (((yy // p) + (xx // p)) % 2 == 0) & (yy >= horizon)
    else:
        sel = rng.random((h // 4 + 1, w // 4 + 1)).repeat(4, 0).repeat(4, 1)[:h, :w] > 0.55
    bg = np.where(sel[..., None], cam.color2, cam.color1).astype(np.float32)
    shade = 1.0 - 0.25 * (yy / h)[..., None] * (1 if cam.kind != "wall_floor" else -1)
    return bg * shade


def apply_camera(rgb: np.ndarray, cam: CameraStyle, rng: np.random.Generator) -> Image.Image:
    """Lighting (with per-image jitter), colour cast, blur and noise; returns a uint8 PIL image."""
    gain = cam.gain * rng.uniform(0.9, 1.1)
    out = np.clip(rgb * gain * cam.cast, 0, 255).astype(np.uint8)
    img = Image.fromarray(out)
    if cam.blur > 0.2:
        img = img.filter(ImageFilter.GaussianBlur(cam.blur))
    arr = np.asarray(img).astype(np.float32) + rng.normal(0.0, cam.noise, (*out.shape[:2], 1)) \
        + rng.normal(0.0, cam.noise * 0.5, out.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
