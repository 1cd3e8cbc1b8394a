"""amfor.engine.data: global PK batches sliced per rank, seeded augmentation, starting mid-epoch."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset

from amfor.data import PKSampler
from amfor.engine.data import GlobalBatchSampler, SeededSamples

PIDS = [i // 5 for i in range(60)]  # 12 identities x 5 images


def batches(world: int, rank: int, epoch: int = 0, start: int = 0) -> list:
    s = GlobalBatchSampler(PKSampler(PIDS, 4, 16, seed=1, num_replicas=1, rank=0), seed=1, rank=rank, world=world)
    s.epoch, s.start = epoch, start
    return list(s)


def test_ranks_take_slices_of_the_same_global_batch():
    one = batches(1, 0, epoch=2)
    two = [batches(2, r, epoch=2) for r in range(2)]
    assert len(one) == len(two[0]) == len(two[1]) > 1
    for b, whole in enumerate(one):
        assert two[0][b] + two[1][b] == whole          # same images and the same augmentation seeds
        for part in (two[0][b], two[1][b]):           # whole identity groups of K = 4 on each rank
            pids = [PIDS[i] for i, _ in part]
            assert all(len(set(pids[k:k + 4])) == 1 for k in range(0, len(pids), 4))


def test_start_skips_batches_and_epochs_differ():
    full = batches(1, 0, epoch=1)
    assert batches(1, 0, epoch=1, start=2) == full[2:]
    assert batches(1, 0, epoch=0) != full
    assert len({seed for batch in full for _, seed in batch}) == sum(len(b) for b in full)  # a seed per sample


class Noisy(Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.rand(2) + i, np.random.rand(), random.random()


def test_seeded_samples_are_reproducible_and_leave_the_main_rngs_alone():
    ds = SeededSamples(Noisy())
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a, b = ds[(3, 123)], ds[(3, 123)]
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    assert not torch.equal(ds[(3, 124)][0], a[0])
    assert torch.equal(torch.get_rng_state(), before)
