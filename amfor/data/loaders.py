"""DataLoader builders for training (PK sampling, augmentation) and testing (fixed order)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader

from .dataset import ReIDImageDataset, image_source
from .records import ImageRecord, ReIDData
from .sampler import PKSampler, seed_worker
from .transforms import REID_MEAN, REID_STD, ReIDTransform


def build_train_loader(data: ReIDData | Sequence[ImageRecord], *, size: tuple[int, int] = (256, 128),
                       batch_size: int = 64, num_instances: int = 4, num_workers: int = 2, seed: int = 0,
                       flip: float = 0.5, pad: int = 10, erasing: float = 0.5, occluder: float = 0.0,
                       occluder_images: bool = True, load_masks: bool = True, on_bad_image: str = "error",
                       num_replicas: int | None = None, rank: int | None = None, mean: Sequence[float] = REID_MEAN,
                       std: Sequence[float] = REID_STD, interpolation: str = "bilinear") -> DataLoader:
    """Training loader over `data.train` (or a record list): PK batches of dict samples (see ReIDImageDataset).

    occluder: probability of pasting a synthetic occluder (shapes, or crops of other training images when
    `occluder_images`). size, mean, std, interpolation: the model's (`resolve_data_config(model)`). Call
    `loader.sampler.set_epoch(epoch)` every epoch.
    """
    records = data.train if isinstance(data, ReIDData) else list(data)
    source = image_source(records, size) if occluder > 0 and occluder_images else None
    transform = ReIDTransform(size, train=True, flip=flip, pad=pad, erasing=erasing, occluder=occluder,
                              occluder_source=source, mean=mean, std=std, interpolation=interpolation)
    dataset = ReIDImageDataset(records, transform, load_masks=load_masks, on_bad_image=on_bad_image)
    sampler = PKSampler([r.pid for r in records], num_instances, batch_size, seed, num_replicas, rank)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=True,
                      worker_init_fn=seed_worker, generator=torch.Generator().manual_seed(seed),
                      persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())


def build_test_loader(records: Sequence[ImageRecord], *, size: tuple[int, int] = (256, 128), batch_size: int = 128,
                      num_workers: int = 2, load_masks: bool = False, mean: Sequence[float] = REID_MEAN,
                      std: Sequence[float] = REID_STD, interpolation: str = "bilinear") -> DataLoader:
    """Test loader in record order (no augmentation): query and gallery loaders keep their lists' order.
    size, mean, std, interpolation: the model's (`resolve_data_config(model)`)."""
    transform = ReIDTransform(size, train=False, mean=mean, std=std, interpolation=interpolation)
    dataset = ReIDImageDataset(records, transform, load_masks=load_masks)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available())
