"""A small AMFOR saved as the trainer saves it (`amfor.engine.runner`'s checkpoint dict), for the deploy commands'
tests: built through the config as `amfor-train` builds it, one training step (so the BatchNorm statistics, the part
branch and the camera means are not those of a fresh model), then written with `save_checkpoint`."""

from __future__ import annotations

from pathlib import Path

import torch

SMALL = {"embed_dim": 32, "depth": 3, "num_heads": 2, "part_heads": 2, "part_ffn_dim": 64, "text": False,
         "amff": False, "hpr": False, "part_recon": False, "recon_fill": False, "amgd": False}


def save_small_amfor(path: Path, name: str = "amfor_vit_small_patch16", num_classes: int = 4, num_cameras: int = 3,
                     seed: int = 0) -> Path:
    """Write a checkpoint of the variant `name` (at its own input size: 256x128 for small, 128x64 for tiny) at a
    small width and depth to `path`."""
    from amfor.config import build_config
    from amfor.engine.build import build_model

    cfg = build_config(None, [f"model.name={name}"] + [f"model.kwargs.{k}={v}" for k, v in SMALL.items()])
    torch.manual_seed(seed)
    model = build_model(cfg, num_classes, num_cameras)
    model.set_train_cameras(range(num_cameras - 1))  # the last camera never seen in training
    batch = 4
    model.train()(torch.randn(batch, 3, *model.input_size), torch.arange(batch) % num_classes,
                  torch.arange(batch) % (num_cameras - 1))
    return save_run_checkpoint(cfg, model, num_cameras, path)


def save_run_checkpoint(cfg, model: torch.nn.Module, num_cameras: int, path: Path, **extra) -> Path:
    """`model` (built from the config `cfg`, stage 1 done) written to `path` with the keys of the trainer's
    checkpoint (`amfor.engine.runner.Run.meta` and the state dict), plus `extra` (e.g. the trainer's position)."""
    from amfor.config import to_dict
    from amfor.engine.checkpoint import save_checkpoint

    state = {"config": to_dict(cfg), "model_name": cfg.model.name, "num_classes": int(model.num_classes),
             "num_cameras": num_cameras, "stage1_finished": True, "model": model.state_dict(), **extra}
    return save_checkpoint(state, path)
