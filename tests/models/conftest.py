"""Small AMFOR models and batches for the model tests (every component on unless switched off)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from amfor.models import AMFOR

SMALL = dict(img_size=(64, 32), patch_size=16, stride=16, embed_dim=64, depth=3, num_heads=2, drop_path_rate=0.0,
             text_width=32, text_heads=2, text_layers=1, text_dim=32, fusion_points=(1, 2), part_heads=2,
             part_ffn_dim=128, hpr_dim=32, hpr_depth=1, hpr_heads=2, recon_dim=32, recon_depth=1, recon_heads=2)
NUM_CLASSES, NUM_CAMERAS = 6, 3


def small_model(**overrides) -> AMFOR:
    torch.manual_seed(0)
    model = AMFOR(NUM_CLASSES, NUM_CAMERAS, **{**SMALL, **overrides})
    model.finish_stage1()
    return model


def make_batch(size: tuple[int, int], batch: int = 4, num_classes: int = NUM_CLASSES, num_cameras: int = NUM_CAMERAS,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """A PK-like batch (two images per identity) with part masks (one image without) and an occluded band."""
    g = torch.Generator().manual_seed(seed)
    H, W = size
    masks = torch.randint(0, 9, (batch, H, W), generator=g)
    masks[-1] = -1  # an image without a parsing mask
    occlusion = torch.zeros(batch, H, W, dtype=torch.bool)
    occlusion[0, H // 2:] = True
    return {"img": torch.randn(batch, 3, H, W, generator=g),
            "pid": (torch.arange(batch) // 2) % num_classes,
            "camid": torch.randint(0, num_cameras, (batch,), generator=g),
            "mask": masks, "occlusion": occlusion}


@pytest.fixture
def batch():
    return make_batch(SMALL["img_size"])


@pytest.fixture
def small():
    """The helpers above, for test modules (conftest is not importable under --import-mode=importlib)."""
    return SimpleNamespace(model=small_model, batch=make_batch, config=SMALL, num_classes=NUM_CLASSES,
                           num_cameras=NUM_CAMERAS)
