"""Input checks and conversion shared by the evaluation functions."""

from __future__ import annotations

import numpy as np
import torch


def as_tensor(x, name: str, device: torch.device | None = None) -> torch.Tensor:
    """`x` (numpy array, tensor or sequence) as a tensor on `device` (default: where it is, CPU for numpy)."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{name}: cannot convert {type(x).__name__} to a tensor ({exc})") from exc
    return t.to(device) if device is not None else t


def check_labels(distmat_shape: tuple[int, int], q_pids, g_pids, q_camids, g_camids,
                 device: torch.device) -> tuple[torch.Tensor, ...]:
    """The four id/camera vectors as int64 tensors on `device`, lengths checked against the matrix shape."""
    nq, ng = distmat_shape
    out = []
    for name, arr, n in (("q_pids", q_pids, nq), ("g_pids", g_pids, ng), ("q_camids", q_camids, nq),
                         ("g_camids", g_camids, ng)):
        t = as_tensor(arr, name, device)
        if t.dim() != 1 or t.numel() != n:
            raise ValueError(f"{name} must be a vector of length {n} to match the distance matrix "
                             f"{nq} x {ng}, got shape {tuple(t.shape)}")
        if t.is_floating_point() and not torch.equal(t, t.round()):
            raise ValueError(f"{name} must hold integers")
        out.append(t.long())
    return tuple(out)


def check_matrix(x, name: str, device: torch.device | None = None, finite: bool = False) -> torch.Tensor:
    """A 2-D floating tensor without NaN; with `finite`, +inf becomes the dtype's max (ties kept, ranks last)."""
    t = as_tensor(x, name, device)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [num_query, num_gallery], got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.double()
    # One cheap float64 reduction proves every value finite (NaN and inf propagate; float32 cannot overflow
    # it); the element-wise checks run only when it does not.
    if not torch.isfinite(t.sum(dtype=torch.float64)):
        if torch.isnan(t).any() or (t == -float("inf")).any():
            raise ValueError(f"{name} contains NaN or -inf")
        if finite:
            t = t.clamp(max=torch.finfo(t.dtype).max)
    return t
