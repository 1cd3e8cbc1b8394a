"""PK identity batches, deterministic per (seed, epoch), and the one sharding path: each rank's slice of every
global batch, each sample with its own augmentation seed."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class PKSampler(Sampler[int]):
    """Yields dataset indices in batches of `num_pids` x `num_instances` (P x K) consecutive indices.

    Per epoch each identity's images are shuffled and cut into groups of K (identities with fewer than
    K images are sampled with replacement to K; an incomplete last group is dropped); batches draw P
    distinct identities that still have groups. The batch list depends on (seed, epoch) only, so every
    rank builds the same one; `GlobalBatchSampler` gives each rank its slice of every batch.
    """

    def __init__(self, pids: Sequence[int], num_instances: int = 4, batch_size: int = 64, seed: int = 0) -> None:
        if num_instances < 1 or batch_size % num_instances != 0:
            raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of "
                             f"num_instances ({num_instances})")
        self.num_pids = batch_size // num_instances
        self.by_pid: dict[int, list[int]] = defaultdict(list)
        for i, pid in enumerate(pids):
            self.by_pid[int(pid)].append(i)
        if len(self.by_pid) < self.num_pids:
            raise ValueError(f"need at least P = {self.num_pids} identities, the dataset has {len(self.by_pid)}")
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
        """The epoch's batches (lists of P*K indices), the same on every rank."""
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
        self._cache = (self.epoch, batches)
        return batches

    def __iter__(self) -> Iterator[int]:
        for batch in self.global_batches():
            yield from batch

    def __len__(self) -> int:
        return len(self.global_batches()) * self.batch_size


def sample_seed(seed: int, epoch: int, batch: int, slot: int) -> int:
    """Augmentation seed of one sample: a fixed mix of its position (no dependency on rank or worker)."""
    return int(np.random.SeedSequence([seed, epoch, batch, slot]).generate_state(1, np.uint64)[0] % 2**63)


class GlobalBatchSampler:
    """Batch sampler: this rank's contiguous slice of each global PK batch of an epoch, from batch `start` on.

    Every rank takes whole identity groups of the same global batch, so N ranks x B/N images see exactly the
    batch one process sees with B. Yields lists of (dataset index, augmentation seed). Set `epoch` and `start`
    before iterating.
    """

    def __init__(self, sampler: PKSampler, seed: int, rank: int = 0, world: int = 1) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
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
