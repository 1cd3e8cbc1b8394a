"""The value-range check shared by the light rooms (nn's patch grid) and the models' entry checks."""

from __future__ import annotations

import torch


def out_of_range(t: torch.Tensor, low: int, high: int) -> tuple[int, int] | None:
    """(min, max) of t if some value lies outside [low, high), else None: one host sync, min/max only on failure.

    Nothing is read (None) under torch.compile: a host read there would break the graph.
    """
    if t.numel() == 0 or torch.compiler.is_compiling() or not bool(((t < low) | (t >= high)).any()):
        return None
    return int(t.min()), int(t.max())
