"""PKSampler: batch composition, determinism per (seed, epoch), DDP disjointness and equal lengths."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from amfor.data import PKSampler


@pytest.fixture
def pids():
    rng = np.random.default_rng(0)
    return [int(p) for p in rng.integers(0, 40, 600)] + [99]  # pid 99 has a single image


def test_batches_have_p_ids_times_k_images(pids):
    s = PKSampler(pids, num_instances=4, batch_size=32, seed=1)
    idx = list(s)
    assert len(idx) == len(s) and len(idx) % 32 == 0 and len(idx) > 0
    for b in range(0, len(idx), 32):
        counts = Counter(pids[i] for i in idx[b:b + 32])
        assert len(counts) == 8 and set(counts.values()) == {4}


def test_deterministic_per_seed_and_epoch(pids):
    a, b = PKSampler(pids, 4, 32, seed=1), PKSampler(pids, 4, 32, seed=1)
    assert list(a) == list(b)
    e0 = list(a)
    a.set_epoch(1)
    assert list(a) != e0
    assert list(PKSampler(pids, 4, 32, seed=2)) != e0


def test_few_images_sampled_with_replacement():
    pids = [0] * 2 + [1] * 4 + [2] * 8
    idx = list(PKSampler(pids, num_instances=4, batch_size=8, seed=0))
    assert Counter(pids[i] for i in idx)[0] in (0, 4)
    assert all(i in (0, 1) for i in idx if pids[i] == 0)


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_ranks_disjoint_equal_length(pids, world):
    ranks = [PKSampler(pids, 4, 32, seed=5, num_replicas=world, rank=r) for r in range(world)]
    shares = [list(s) for s in ranks]
    assert len({len(x) for x in shares}) == 1 and all(len(x) == len(s) for x, s in zip(shares, ranks, strict=True))
    sets = [set(x) for x in shares]
    for i in range(world):
        for j in range(i + 1, world):
            assert not (sets[i] & sets[j])


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple"):
        PKSampler([0, 1], num_instances=3, batch_size=8)
    with pytest.raises(ValueError, match="identities"):
        PKSampler([0, 1], num_instances=4, batch_size=16)
    with pytest.raises(ValueError, match="rank"):
        PKSampler(list(range(20)), 4, 8, num_replicas=2, rank=2)
