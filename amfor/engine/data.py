"""Training batches that can be resumed exactly, on any number of ranks.

`amfor.data.build_train_loader` gives the dataset (augmentation) and the PK sampler; here they are
driven so that
- every rank takes its contiguous slice of the same *global* PK batch (whole identity groups), so N
  ranks x B/N images see exactly the batch one process sees with B;
- every sample's augmentation is drawn from its own seed (run seed, epoch, batch, position), not from a
  worker's running RNG, so a run resumed mid-epoch (at any batch, with any worker count) draws the same
  augmentations as an uninterrupted one;
- an epoch can start at any batch (the loader position stored in checkpoints).
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from ..data import PKSampler, build_train_loader
from ..data.records import ReIDData


def sample_seed(seed: int, epoch: int, batch: int, slot: int) -> int:
    """Augmentation seed of one sample: a fixed mix of its position (no dependency on rank or worker)."""
    return int(np.random.SeedSequence([seed, epoch, batch, slot]).generate_state(1, np.uint64)[0] % 2**63)


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


class GlobalBatchSampler:
    """Batch sampler: this rank's slice of each global PK batch of an epoch, from batch `start` on.

    Yields lists of (dataset index, augmentation seed). Set `epoch` and `start` before iterating.
    """

    def __init__(self, sampler: PKSampler, seed: int, rank: int = 0, world: int = 1) -> None:
        if sampler.num_replicas != 1:
            raise ValueError("GlobalBatchSampler shards itself: build the PKSampler with num_replicas=1")
        if sampler.batch_size % (world * sampler.k):
            raise ValueError(f"the global batch ({sampler.batch_size}) must be a multiple of world size x K "
                             f"({world} x {sampler.k})")
        self.sampler, self.seed, self.rank, self.world = sampler, seed, rank, world
        self.per_rank = sampler.batch_size // world
        self.epoch, self.start = 0, 0

    def batches_per_epoch(self, epoch: int = 0) -> int:
        self.sampler.set_epoch(epoch)
        return len(self.sampler.global_batches())

    def __iter__(self):
        self.sampler.set_epoch(self.epoch)
        lo = self.rank * self.per_rank
        for b, batch in enumerate(self.sampler.global_batches()):
            if b < self.start:
                continue
            yield [(int(batch[j]), sample_seed(self.seed, self.epoch, b, j)) for j in range(lo, lo + self.per_rank)]

    def __len__(self) -> int:
        return self.batches_per_epoch(self.epoch) - self.start


class EpochLoader:
    """A DataLoader over a GlobalBatchSampler: `epoch_iter(epoch, start)` iterates one epoch from batch `start`."""

    def __init__(self, loader: DataLoader, batch_sampler: GlobalBatchSampler) -> None:
        self.loader, self.batch_sampler = loader, batch_sampler
        self._lengths: dict[int, int] = {}

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

    def close(self) -> None:
        """Stop the persistent workers now (else their iterator lingers and is copied into later forks)."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None


def auto_num_workers(requested: int, local_ranks: int = 1) -> int:
    """-1: the CPUs of this rank minus one for the training process, between 1 and 8."""
    if requested >= 0:
        return requested
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus // max(1, local_ranks) - 1))


def build_epoch_loader(data: ReIDData, cfg, size: tuple[int, int], rank: int, world: int,
                       num_workers: int, norm: dict | None = None) -> EpochLoader:
    """The stage-2 loader: amfor.data's dataset and PK sampler, driven per global batch with seeded samples.
    norm: the model's mean, std and interpolation (`resolve_data_config(model)`; None: the ReID defaults)."""
    d = cfg.data
    base = build_train_loader(data, size=tuple(size), batch_size=cfg.train.batch_size, num_instances=d.num_instances,
                              num_workers=0, seed=cfg.train.seed, flip=d.flip, pad=d.pad, erasing=d.erasing,
                              occluder=d.occluder, load_masks=d.load_masks, num_replicas=1, rank=0, **(norm or {}))
    batch_sampler = GlobalBatchSampler(base.sampler, cfg.train.seed, rank, world)
    loader = DataLoader(SeededSamples(base.dataset), batch_sampler=batch_sampler, num_workers=num_workers,
                        persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
                        generator=torch.Generator().manual_seed(cfg.train.seed),
                        prefetch_factor=4 if num_workers > 0 else None)
    return EpochLoader(loader, batch_sampler)
