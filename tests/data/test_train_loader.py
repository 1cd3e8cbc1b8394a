"""The training loader: global PK batches sliced per rank, seeded augmentation, starting mid-epoch."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from amfor.data import GlobalBatchSampler, PKSampler, SeededSamples, build_dataset, build_train_loader

PIDS = [i // 5 for i in range(60)]  # 12 identities x 5 images


def batches(world: int, rank: int, epoch: int = 0, start: int = 0) -> list:
    s = GlobalBatchSampler(PKSampler(PIDS, 4, 16, seed=1), seed=1, rank=rank, world=world)
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


def test_bad_rank_or_world():
    with pytest.raises(ValueError, match="rank 2 is not in"):
        GlobalBatchSampler(PKSampler(PIDS, 4, 16), seed=0, rank=2, world=2)
    with pytest.raises(ValueError, match="multiple of world size x K"):
        GlobalBatchSampler(PKSampler(PIDS, 4, 16), seed=0, rank=0, world=3)


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


# --- build_train_loader on a real (synthetic, tiny) dataset ---------------------------------------------------
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return build_dataset("synthetic", str(tmp_path_factory.mktemp("syn")), size="tiny", seed=0)


def loader(data, rank: int = 0, world: int = 1):
    return build_train_loader(data, size=(32, 16), batch_size=8, num_instances=4, num_workers=0, seed=3, rank=rank,
                              world=world, erasing=0.5, occluder=0.5)


def test_two_ranks_load_the_one_process_batch(tiny_data):
    """Rank r of 2 loads the r-th half of each batch one process loads: the same images, augmented alike."""
    one = loader(tiny_data)
    ranks = [loader(tiny_data, r, 2) for r in range(2)]
    assert one.epoch_length(1) == ranks[0].epoch_length(1) == ranks[1].epoch_length(1) > 1
    assert one.steps_for_epochs(2) == one.epoch_length(0) + one.epoch_length(1)
    for whole, *halves in zip(one.epoch_iter(1), *(r.epoch_iter(1) for r in ranks), strict=True):
        assert [len(h["img"]) for h in halves] == [4, 4]
        for key in ("img", "pid", "camid", "mask", "occlusion"):
            assert torch.equal(torch.cat([h[key] for h in halves]), whole[key]), key
        assert sum((h["path"] for h in halves), []) == whole["path"]


def test_an_epoch_started_mid_way_loads_the_same_batches(tiny_data):
    """`epoch_iter(epoch, start)` (a resumed run) gives batches start.. of the uninterrupted epoch, augmentations
    included, whatever the main process's RNGs hold; `iter(loader)` is the epoch set by `set_epoch`."""
    dl = loader(tiny_data)
    full = list(dl.epoch_iter(2))
    torch.manual_seed(123)
    np.random.seed(123)
    later = list(dl.epoch_iter(2, start=1))
    assert len(later) == len(full) - 1 > 0
    for a, b in zip(full[1:], later, strict=True):
        assert torch.equal(a["img"], b["img"]) and a["path"] == b["path"]
    dl.set_epoch(2)
    assert len(dl) == len(full) and torch.equal(next(iter(dl))["img"], full[0]["img"])
    assert not torch.equal(next(iter(dl.epoch_iter(0)))["img"], full[0]["img"])
    dl.close()
