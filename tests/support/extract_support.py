"""What the extraction tests share: a small AMFOR with every branch on, saved as a run's checkpoint, and a folder of
images written with PIL (nested folders, Market-style names with cameras, a corrupt file, a file that is no image)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from amfor_checkpoint import save_run_checkpoint
from PIL import Image

from amfor.config import build_config

NAME = "amfor_vit_tiny_patch16"
# every branch on (text bank, AMFF, parts, teacher, AMGD, HPR, part reconstruction used at test time, camera
# centring), at sizes that run in a fraction of a second; the variant's 128x64 input (a config's list img_size would
# reach the backbone as a ListConfig)
KWARGS = dict(embed_dim=32, depth=3, num_heads=2, part_heads=2, part_ffn_dim=64, text_width=32,
              text_heads=2, text_layers=1, text_dim=32, hpr_dim=32, hpr_heads=2, recon_dim=32, recon_heads=2,
              fusion_points=[1, 2], amff=True, text=True, amgd=True, hpr=True, part_recon=True, recon_fill=True,
              camera_centering=True)
NUM_CLASSES, NUM_CAMERAS = 4, 3


def small_amfor() -> torch.nn.Module:
    """The small AMFOR after stage 1 and one training step (BN statistics, camera means moved), cameras 0 and 1
    seen in training, in eval mode."""
    import amfor

    torch.manual_seed(0)
    model = amfor.create_model(NAME, NUM_CLASSES, num_cameras=NUM_CAMERAS, **KWARGS)
    model.set_train_cameras([0, 1])
    model.finish_stage1()
    model.train()(torch.randn(4, 3, *model.input_size), torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1]))
    return model.eval()


def write_checkpoint(model: torch.nn.Module, path: Path) -> Path:
    """`model` saved as the trainer saves a run's checkpoint (config, model name, classes, cameras, state)."""
    cfg = build_config(overrides=[f"model.name={NAME}", "device=cpu"])
    cfg.model.kwargs = KWARGS
    return save_run_checkpoint(cfg, model, NUM_CAMERAS, path, trainer={"stage": 2, "step": 1})


def image_folder(root: Path) -> dict[str, list[str]]:
    """Images of several sizes and formats under root (nested), a corrupt .jpg and a text file. Returns {"good":
    relative paths of the images, sorted, "bad": the corrupt one, "other": the non-image}."""
    rng = np.random.default_rng(0)
    good = ["0001_c1s1_000151_01.jpg", "0001_c2s1_000301_01.png", "cam_a/0002_c3s2_000101_02.jpg",
            "cam_a/deep/0003_c1s3_000051_01.bmp", "cam_a/deep/x.jpeg", "cam_b/0004_c2s1_001001_01.png"]
    for k, rel in enumerate(good):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        h, w = 40 + 13 * k, 20 + 5 * k
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    (root / "cam_b" / "0005_c1s1_000001_01.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "cam_a" / "notes.txt").write_text("not an image")
    return {"good": sorted(good), "bad": ["cam_b/0005_c1s1_000001_01.jpg"], "other": ["cam_a/notes.txt"]}
