"""torch's intra-op thread count set for a block of code and restored after it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """`torch.set_num_threads(n)` inside the block, the previous count restored after it (also on an error).

    The count is process-wide: other threads of the process run with it meanwhile."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
