"""PK identity sampler: batches of P identities x K images, deterministic per (seed, epoch), DDP-aware."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler


class PKSampler(Sampler[int]):
    """Yields dataset indices in batches of `num_pids` x `num_instances` (P x K) consecutive indices.

    Per epoch each identity's images are shuffled and cut into groups of K (identities with fewer than
    K images are sampled with replacement to K; an incomplete last group is dropped); batches draw P
    distinct identities that still have groups. All ranks build the same global batch list from
    (seed, epoch), truncate it to a multiple of `num_replicas`, and rank r takes batches r, r+R, ...:
    disjoint shares of equal length. Use DataLoader(batch_size=P*K, sampler=this, drop_last=True).
    """

    def __init__(self, pids: Sequence[int], num_instances: int = 4, batch_size: int = 64, seed: int = 0,
                 num_replicas: int | None = None, rank: int | None = None) -> None:
        if num_instances < 1 or batch_size % num_instances != 0:
            raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of "
                             f"num_instances ({num_instances})")
        self.num_pids = batch_size // num_instances
        self.by_pid: dict[int, list[int]] = defaultdict(list)
        for i, pid in enumerate(pids):
            self.by_pid[int(pid)].append(i)
        if len(self.by_pid) < self.num_pids:
            raise ValueError(f"need at least P = {self.num_pids} identities, the dataset has {len(self.by_pid)}")
        ddp = dist.is_available() and dist.is_initialized()
        self.num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if ddp else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if ddp else 0)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is not in [0, {self.num_replicas})")
        self.k, self.batch_size, self.seed, self.epoch = num_instances, batch_size, seed, 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _groups(self, rng: np.random.Generator) -> dict[int, list[list[int]]]:
        groups = {}
        for pid in sorted(self.by_pid):
            idx = np.array(self.by_pid[pid])
            idx = rng.choice(idx, self.k, replace=True) if len(idx) < self.k else rng.permutation(idx)
            groups[pid] = [idx[s:s + self.k].tolist() for s in range(0, len(idx) - self.k + 1, self.k)]
        return groups

    def global_batches(self) -> list[list[int]]:
        """The epoch's batches (lists of P*K indices), identical on every rank, truncated to a multiple of R."""
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, self.epoch])
        groups, batches = self._groups(rng), []
        while True:
            alive = [pid for pid in groups if groups[pid]]
            if len(alive) < self.num_pids:
                break
            batch = []
            for pid in rng.choice(alive, self.num_pids, replace=False):
                batch += groups[int(pid)].pop()
            batches.append(batch)
        batches = batches[:len(batches) - len(batches) % self.num_replicas]
        self._cache = (self.epoch, batches)
        return batches

    def __iter__(self) -> Iterator[int]:
        for batch in self.global_batches()[self.rank::self.num_replicas]:
            yield from batch

    def __len__(self) -> int:
        return len(self.global_batches()) // self.num_replicas * self.batch_size


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: derive numpy's seed from torch's per-worker seed (augmentation RNG)."""
    np.random.seed(torch.initial_seed() % 2**32)
