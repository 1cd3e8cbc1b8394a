"""What every Triton launch site of amfor.kernels shares: the tensor's device made current, and its limits.

- `on_device(t)`: Triton launches on the *current* CUDA device and stream, not on the tensor's; each launcher
  runs inside `with on_device(x):` so a tensor on cuda:1 is computed on cuda:1 whatever device is current.
- `shared_memory_limit(device)`: the opt-in shared memory a block may use on `device` (99 KiB on sm_86/sm_89,
  163 KiB on sm_80, 227 KiB on sm_90), so launchers pick tile sizes that fit. `TARGET_SHARED_MEMORY`
  overrides it (scripts/gpu_compile_check.py sets it to each target's limit when compiling without a GPU).
- `INTERPRETED`: whether the kernels run under the Triton interpreter (TRITON_INTERPRET=1, read at import as
  triton.jit does); launchers take their GPU choices (tensor cores, tf32) only when not interpreted.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
TARGET_SHARED_MEMORY: int | None = None  # bytes; set by the offline compile check for its target
DEFAULT_SHARED_MEMORY = 99 * 1024  # the smallest opt-in limit of the supported GPUs (sm_86 / sm_89)


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """The tensor's CUDA device as the current one for the launch inside the block (a no-op off CUDA)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def shared_memory_limit(device: torch.device) -> int:
    """Bytes of shared memory one program may use on `device` (the opt-in maximum per block)."""
    if TARGET_SHARED_MEMORY is not None:
        return TARGET_SHARED_MEMORY
    if device.type != "cuda":
        return DEFAULT_SHARED_MEMORY  # the interpreter has no limit; keep the tiles a GPU would get
    return _cuda_shared_memory(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_shared_memory(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    limit = getattr(props, "shared_memory_per_block_optin", None)
    if limit:
        return int(limit)
    try:  # older torch: ask Triton's driver
        import triton

        return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:  # noqa: BLE001 - no better source: the smallest limit of the supported GPUs
        return DEFAULT_SHARED_MEMORY
