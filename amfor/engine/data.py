"""The run's training loader from its config (`amfor.data.build_train_loader`), and the loader worker count."""

from __future__ import annotations

import os

from ..data import EpochLoader, build_train_loader
from ..data.records import ReIDData


def auto_num_workers(requested: int, local_ranks: int = 1) -> int:
    """-1: the CPUs of this rank minus one for the training process, between 1 and 8."""
    if requested >= 0:
        return requested
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus // max(1, local_ranks) - 1))


def build_epoch_loader(data: ReIDData, cfg, size: tuple[int, int], rank: int, world: int,
                       num_workers: int, norm: dict | None = None) -> EpochLoader:
    """The stage-2 loader of config `cfg` (data.*, train.batch_size, train.seed): this rank's slice of every global
    batch. norm: the model's mean, std and interpolation (`resolve_data_config(model)`; None: the ReID defaults)."""
    d = cfg.data
    return build_train_loader(data, batch_size=cfg.train.batch_size, num_instances=d.num_instances,
                              num_workers=num_workers, seed=cfg.train.seed, rank=rank, world=world, size=tuple(size),
                              flip=d.flip, pad=d.pad, erasing=d.erasing, occluder=d.occluder,
                              load_masks=d.load_masks, **(norm or {}))
