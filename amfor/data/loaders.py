"""Loaders: training batches that resume exactly on any number of ranks, and test batches in a fixed order.

The training loader
- gives every rank its contiguous slice of the same *global* PK batch (whole identity groups), so N ranks x
  B/N images see exactly the batch one process sees with B (`GlobalBatchSampler`);
- draws every sample's augmentation from its own seed (run seed, epoch, batch, position), not from a worker's
  running RNG, so a run resumed mid-epoch (at any batch, with any worker count) draws the same augmentations
  as an uninterrupted one;
- starts an epoch at any batch (the loader position stored in checkpoints): `epoch_iter(epoch, start)`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from .dataset import ReIDImageDataset, image_source
from .records import ImageRecord, ReIDData
from .sampler import GlobalBatchSampler, PKSampler
from .transforms import REID_MEAN, REID_STD, ReIDTransform


class SeededSamples(Dataset):
    """`dataset[(index, seed)]` = `dataset[index]` drawn with torch, numpy and random seeded by `seed`."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def _draw(self, index: int, seed: int):
        # the CPU generator only: torch.manual_seed also queues a seed for every lazily initialised accelerator
        # (CUDA, XPU), each capturing a Python stack, which cost a fifth of a sample's time in the loader
        torch.default_generator.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        return self.dataset[index]

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        if get_worker_info() is not None:
            return self._draw(index, seed)
        np_state, py_state = np.random.get_state(), random.getstate()  # in the main process: leave its RNGs alone
        with torch.random.fork_rng(devices=[]):
            out = self._draw(index, seed)
        np.random.set_state(np_state)
        random.setstate(py_state)
        return out


class EpochLoader:
    """A DataLoader over a GlobalBatchSampler: `epoch_iter(epoch, start)` iterates one epoch from batch `start`;
    `iter(loader)` iterates the epoch set by `set_epoch` (0 at first) from its start."""

    def __init__(self, loader: DataLoader, batch_sampler: GlobalBatchSampler) -> None:
        self.loader, self.batch_sampler = loader, batch_sampler
        self.epoch = 0
        self._lengths: dict[int, int] = {}

    @property
    def dataset(self) -> Dataset:
        """The training dataset (without the seeding wrapper)."""
        return self.loader.dataset.dataset

    def epoch_length(self, epoch: int) -> int:
        """Batches of epoch `epoch` (PK epochs differ by a batch or so with the draw; computed once, cheap)."""
        if epoch not in self._lengths:
            self._lengths[epoch] = self.batch_sampler.batches_per_epoch(epoch)
        return self._lengths[epoch]

    def steps_for_epochs(self, epochs: int) -> int:
        return sum(self.epoch_length(e) for e in range(epochs))

    def epoch_iter(self, epoch: int, start: int = 0):
        self.batch_sampler.epoch, self.batch_sampler.start = epoch, start
        return iter(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return self.epoch_iter(self.epoch)

    def __len__(self) -> int:
        return self.epoch_length(self.epoch)

    def close(self) -> None:
        """Stop the persistent workers now (else their iterator lingers and is copied into later forks)."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None


def build_train_dataset(data: ReIDData | Sequence[ImageRecord], *, size: tuple[int, int] = (256, 128),
                        flip: float = 0.5, pad: int = 10, erasing: float = 0.5, occluder: float = 0.0,
                        occluder_images: bool = True, load_masks: bool = True, on_bad_image: str = "error",
                        mean: Sequence[float] = REID_MEAN, std: Sequence[float] = REID_STD,
                        interpolation: str = "bilinear") -> ReIDImageDataset:
    """The augmented training dataset over `data.train` (or a record list): dict samples (see ReIDImageDataset).

    occluder: probability of pasting a synthetic occluder (shapes, or crops of other training images when
    `occluder_images`). size, mean, std, interpolation: the model's (`resolve_data_config(model)`).
    """
    records = data.train if isinstance(data, ReIDData) else list(data)
    source = image_source(records, size) if occluder > 0 and occluder_images else None
    transform = ReIDTransform(size, train=True, flip=flip, pad=pad, erasing=erasing, occluder=occluder,
                              occluder_source=source, mean=mean, std=std, interpolation=interpolation)
    return ReIDImageDataset(records, transform, load_masks=load_masks, on_bad_image=on_bad_image)


def build_train_loader(data: ReIDData | Sequence[ImageRecord], *, batch_size: int = 64, num_instances: int = 4,
                       num_workers: int = 2, seed: int = 0, rank: int = 0, world: int = 1,
                       **dataset_kwargs) -> EpochLoader:
    """Training loader: this rank's slice of every global PK batch (`batch_size` = P x K images over all `world`
    ranks), each sample augmented from its own seed. dataset_kwargs: `build_train_dataset`'s (size, flip, pad,
    erasing, occluder, occluder_images, load_masks, on_bad_image, mean, std, interpolation)."""
    dataset = build_train_dataset(data, **dataset_kwargs)
    sampler = PKSampler([r.pid for r in dataset.records], num_instances, batch_size, seed)
    batch_sampler = GlobalBatchSampler(sampler, seed, rank, world)
    loader = DataLoader(SeededSamples(dataset), batch_sampler=batch_sampler, num_workers=num_workers,
                        persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
                        generator=torch.Generator().manual_seed(seed), prefetch_factor=4 if num_workers > 0 else None)
    return EpochLoader(loader, batch_sampler)


def build_test_loader(records: Sequence[ImageRecord], *, size: tuple[int, int] = (256, 128), batch_size: int = 128,
                      num_workers: int = 2, load_masks: bool = False, mean: Sequence[float] = REID_MEAN,
                      std: Sequence[float] = REID_STD, interpolation: str = "bilinear") -> DataLoader:
    """Test loader in record order (no augmentation): query and gallery loaders keep their lists' order.
    size, mean, std, interpolation: the model's (`resolve_data_config(model)`)."""
    transform = ReIDTransform(size, train=False, mean=mean, std=std, interpolation=interpolation)
    dataset = ReIDImageDataset(records, transform, load_masks=load_masks)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available())
