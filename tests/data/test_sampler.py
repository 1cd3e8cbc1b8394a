"""PKSampler: batch composition, determinism per (seed, epoch); GlobalBatchSampler: every rank's share."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from amfor.data import GlobalBatchSampler, PKSampler


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


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_share_every_batch_disjointly(pids, world):
    """The one sharding path: rank r takes the r-th contiguous slice of every global batch (whole K-groups)."""
    s = PKSampler(pids, 4, 32, seed=5)
    shares = [list(GlobalBatchSampler(s, seed=5, rank=r, world=world)) for r in range(world)]
    assert len({len(x) for x in shares}) == 1 and len(shares[0]) == len(s.global_batches())
    for b, batch in enumerate(s.global_batches()):
        parts = [[i for i, _ in share[b]] for share in shares]
        assert sum(parts, []) == batch
        assert all(len({pids[i] for i in part[k:k + 4]}) == 1 for part in parts for k in range(0, len(part), 4))


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple"):
        PKSampler([0, 1], num_instances=3, batch_size=8)
    with pytest.raises(ValueError, match="identities"):
        PKSampler([0, 1], num_instances=4, batch_size=16)
