"""Distributed helpers: torchrun initialisation, rank queries, gathers of features and of small objects.

Launch with `torchrun --nproc_per_node=N [--nnodes ... --rdzv_endpoint ...] -m amfor.train ...`: the
environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE) selects DistributedDataParallel, with NCCL
on GPUs and gloo on CPUs. Without it everything here degrades to the single-process case.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterable

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return get_rank() == 0


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda:LOCAL_RANK when CUDA is available, else cpu; `cuda` -> cuda:LOCAL_RANK."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local}"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} was asked for but CUDA is not available (use --device cpu)")
        torch.cuda.set_device(device)
    return device


def init_distributed(device: torch.device) -> bool:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL for CUDA devices, gloo otherwise)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_dist():
        return is_dist()
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend=backend, **kwargs)
    return True


def cleanup() -> None:
    """Leave the process group: first free what still holds it (a DDP reducer kept alive by reference cycles, e.g.
    trainer <-> hooks), which at interpreter exit would be destroyed after the group and abort the process."""
    if is_dist():
        gc.collect()
        dist.destroy_process_group()


def barrier() -> None:
    if is_dist():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (e.g. the run folder name)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(n: int, rank: int | None = None, world: int | None = None) -> slice:
    """Contiguous share of `range(n)` for a rank: concatenating the shares in rank order gives range(n)."""
    rank, world = (get_rank() if rank is None else rank), (get_world_size() if world is None else world)
    return slice(n * rank // world, n * (rank + 1) // world)


def all_gather_cat(t: torch.Tensor, n_total: int) -> torch.Tensor:
    """Concatenate each rank's `t` ([n_r, ...], shares from `shard`) in rank order -> [n_total, ...] everywhere.

    Shares may differ in length by one; they are padded to the longest for the collective and trimmed.
    """
    world = get_world_size()
    if world == 1:
        return t
    longest = max(shard(n_total, r, world).stop - shard(n_total, r, world).start for r in range(world))
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[:t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    sizes = [shard(n_total, r, world).stop - shard(n_total, r, world).start for r in range(world)]
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])


def all_reduce_mean_(tensors: Iterable[torch.Tensor]) -> None:
    """Average tensors over ranks in place (one collective over their flat concatenation)."""
    tensors = [t for t in tensors if t is not None]
    if not is_dist() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(t)
    return t


def broadcast_tensors(tensors: Iterable[torch.Tensor]) -> None:
    """Rank 0's values of `tensors` on every rank, in place."""
    if is_dist():
        for t in tensors:
            dist.broadcast(t, src=0)
