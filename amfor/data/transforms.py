"""Joint image / part-mask / occlusion-map transforms for ReID training and testing.

Geometric steps (resize, flip, pad, random crop) run through torchvision.transforms.v2 on an Image and
two Masks together (masks are resized with nearest neighbour). Flips swap the left/right part labels.
Occluder pasting and random erasing are ours: they also zero the part mask (covered pixels are not
visible body) and set the occlusion map, which tells the HPR branch which pixels were covered.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from amfor.nn.patch_grid import patch_occlusion  # noqa: F401  (re-exported: it used to live here)
from amfor.schema import FLIP_PAIRS, NO_MASK, REID_MEAN, REID_STD

Sample = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # img [3, H, W] float, mask [H, W] long, occ [H, W] bool

INTERPOLATIONS = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC,
                  "nearest": v2.InterpolationMode.NEAREST}


def resolve_data_config(model=None, size: tuple[int, int] | None = None) -> dict:
    """What the model's input expects, from its timm-style `pretrained_cfg`: {"size": (H, W), "mean", "std",
    "interpolation"}. A model without one (a user's factory, a stand-in) gets `size` (else its `input_size`) and
    the ReID normalisation."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    if "input_size" in cfg:
        size = tuple(cfg["input_size"][-2:])
    elif size is None:
        size = tuple(model.input_size)
    interpolation = cfg.get("interpolation", "bilinear")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"pretrained_cfg interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")
    return {"size": tuple(int(v) for v in size), "mean": tuple(cfg.get("mean", REID_MEAN)),
            "std": tuple(cfg.get("std", REID_STD)), "interpolation": interpolation}


def swap_parts(mask: torch.Tensor, pairs: Sequence[tuple[int, int]] = FLIP_PAIRS) -> torch.Tensor:
    """Exchange left/right part labels (after a horizontal flip)."""
    lut = torch.arange(max(int(mask.max()) + 1, max(max(p) for p in pairs) + 1), dtype=mask.dtype)
    for a, b in pairs:
        lut[a], lut[b] = b, a
    return torch.where(mask >= 0, lut[mask.clamp(min=0)], mask)


class OccluderPaste:
    """Paste a synthetic occluder from an image border: a textured shape, or a crop of another image.

    p: probability per sample; area: occluder area as a fraction of the image; source: callable returning
    a random [3, h, w] float image in [0, 1] (e.g. another training image) used with probability p_image.
    """

    def __init__(self, p: float = 0.5, area: tuple[float, float] = (0.1, 0.4),
                 source: Callable[[], torch.Tensor] | None = None, p_image: float = 0.5) -> None:
        self.p, self.area, self.source, self.p_image = p, area, source, p_image

    def box(self, h: int, w: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) of an occluder touching the bottom, left, right or top border."""
        frac = float(torch.empty(1).uniform_(*self.area))
        side = int(torch.randint(4, (1,)))
        if side == 0 or side == 3:  # bottom / top: full width band, partial width sometimes
            bw = w if torch.rand(1) < 0.5 else max(1, int(w * float(torch.empty(1).uniform_(0.5, 1.0))))
            bh = min(h, max(1, round(frac * h * w / bw)))
            top, left = (h - bh if side == 0 else 0), int(torch.randint(0, w - bw + 1, (1,)))
        else:  # left / right: vertical band
            bh = h if torch.rand(1) < 0.5 else max(1, int(h * float(torch.empty(1).uniform_(0.5, 1.0))))
            bw = min(w, max(1, round(frac * h * w / bh)))
            top, left = int(torch.randint(0, h - bh + 1, (1,))), (0 if side == 1 else w - bw)
        return top, left, bh, bw

    def patch(self, bh: int, bw: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Occluder pixels [3, bh, bw] and its shape mask [bh, bw] (rectangle or ellipse)."""
        if self.source is not None and torch.rand(1) < self.p_image:
            src = self.source()
            sh, sw = src.shape[-2:]
            ch, cw = max(1, sh // 2), max(1, sw // 2)
            y, x = int(torch.randint(0, sh - ch + 1, (1,))), int(torch.randint(0, sw - cw + 1, (1,)))
            pix = F.interpolate(src[None, :, y:y + ch, x:x + cw], size=(bh, bw), mode="bilinear")[0]
        else:
            pix = torch.rand(3, 1, 1) * (0.8 + 0.4 * torch.rand(1, bh, bw))
        shape = torch.ones(bh, bw, dtype=torch.bool)
        if torch.rand(1) < 0.4:
            yy, xx = torch.meshgrid(torch.linspace(-1, 1, bh), torch.linspace(-1, 1, bw), indexing="ij")
            shape = yy**2 + xx**2 <= 1.0
        return pix.clamp(0, 1), shape

    def __call__(self, img: torch.Tensor, mask: torch.Tensor, occ: torch.Tensor) -> Sample:
        if torch.rand(1) >= self.p:
            return img, mask, occ
        h, w = img.shape[-2:]
        top, left, bh, bw = self.box(h, w)
        pix, shape = self.patch(bh, bw)
        region = (slice(top, top + bh), slice(left, left + bw))
        img, mask, occ = img.clone(), mask.clone(), occ.clone()
        img[:, region[0], region[1]] = torch.where(shape, pix, img[:, region[0], region[1]])
        mask[region] = torch.where(shape & (mask[region] >= 0), 0, mask[region])
        occ[region] |= shape
        return img, mask, occ


class JointErasing:
    """Random erasing (box sampling from torchvision v2.RandomErasing) that also updates mask and occlusion."""

    def __init__(self, p: float = 0.5, scale=(0.02, 0.4), ratio=(0.3, 3.3), value: float | str = 0.0) -> None:
        self.p = p
        self.eraser = v2.RandomErasing(p=1.0, scale=scale, ratio=ratio, value=value)

    def __call__(self, img: torch.Tensor, mask: torch.Tensor, occ: torch.Tensor) -> Sample:
        if torch.rand(1) >= self.p:
            return img, mask, occ
        prm = self.eraser.make_params([img])
        if prm["v"] is None:
            return img, mask, occ
        i, j, h, w = prm["i"], prm["j"], prm["h"], prm["w"]
        img, mask, occ = img.clone(), mask.clone(), occ.clone()
        img[:, i:i + h, j:j + w] = prm["v"]
        mask[i:i + h, j:j + w] = torch.where(mask[i:i + h, j:j + w] >= 0, 0, mask[i:i + h, j:j + w])
        occ[i:i + h, j:j + w] = True
        return img, mask, occ


class ReIDTransform:
    """The ReID pipeline applied to (PIL image, part mask or None) -> (img, mask, occlusion).

    Train: resize, flip (p=flip), pad + random crop, synthetic occluders, normalise, random erasing.
    Test: resize and normalise. Shapes out: img [3, H, W] float, mask [H, W] long (-1 everywhere when
    the image has no parsing mask), occlusion [H, W] bool (True where an occluder or erasing covered).
    size, mean, std, interpolation: the model's (`resolve_data_config(model)`).
    """

    def __init__(self, size: tuple[int, int] = (256, 128), train: bool = True, flip: float = 0.5, pad: int = 10,
                 erasing: float = 0.5, occluder: float = 0.0, occluder_source: Callable[[], torch.Tensor] | None = None,
                 mean: Sequence[float] = REID_MEAN, std: Sequence[float] = REID_STD,
                 flip_pairs: Sequence[tuple[int, int]] = FLIP_PAIRS, interpolation: str = "bilinear") -> None:
        self.size, self.train, self.flip, self.flip_pairs = tuple(size), train, flip, tuple(flip_pairs)
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")
        steps = [v2.Resize(self.size, interpolation=INTERPOLATIONS[interpolation], antialias=True)]
        if train and pad > 0:
            steps += [v2.Pad(pad, fill={tv_tensors.Image: 0, tv_tensors.Mask: 0}), v2.RandomCrop(self.size)]
        self.geometric = v2.Compose(steps)
        self.occluder = OccluderPaste(occluder, source=occluder_source) if train and occluder > 0 else None
        self.erasing = JointErasing(erasing) if train and erasing > 0 else None
        self.normalize = v2.Normalize(mean, std)

    def __call__(self, img: Image.Image, mask=None) -> Sample:
        image = TF.to_dtype(TF.to_image(img), torch.float32, scale=True)
        has_mask = mask is not None
        part = torch.as_tensor(mask, dtype=torch.long) if has_mask else torch.zeros(image.shape[-2:], dtype=torch.long)
        if part.shape != image.shape[-2:]:
            part = TF.resize(tv_tensors.Mask(part[None]), list(image.shape[-2:]))[0]
        occ = torch.zeros(image.shape[-2:], dtype=torch.uint8)
        image, part, occ = self.geometric(image, tv_tensors.Mask(part), tv_tensors.Mask(occ))
        image, part, occ = image.as_subclass(torch.Tensor), part.as_subclass(torch.Tensor), occ.bool()
        if self.train and torch.rand(1) < self.flip:
            image, part, occ = image.flip(-1), swap_parts(part.flip(-1), self.flip_pairs), occ.flip(-1)
        if not has_mask:
            part = torch.full_like(part, NO_MASK)
        if self.occluder is not None:
            image, part, occ = self.occluder(image, part, occ)
        image = self.normalize(image)
        if self.erasing is not None:
            image, part, occ = self.erasing(image, part, occ)
        return image, part, occ.as_subclass(torch.Tensor)
