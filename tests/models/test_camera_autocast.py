"""Camera centring under autocast: the per-camera sums and their all-reduce stay float32."""

from __future__ import annotations

import pytest
import torch

from amfor.models.camera import CameraCentering


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_running_means_are_float32_sums_under_autocast(dtype):
    """Features near 100 (a low-precision sum of 64 of them is off by whole units): the means match float64."""
    g = torch.Generator().manual_seed(0)
    x = 100 + torch.randn(64, 2, 8, generator=g)
    cams = torch.arange(64) % 2
    cc = CameraCentering(num_cameras=2, num_slots=2, dim=8).train()
    with torch.autocast("cpu", dtype=dtype):
        cc(x.to(dtype), cams)
    xd = x.to(dtype).double()
    want = torch.stack([xd[cams == c].mean(0) for c in range(2)]).float()
    torch.testing.assert_close(cc.running_mean, want)


def test_all_reduce_receives_float32_under_autocast(monkeypatch):
    """Under torch.distributed the sums and counts are all-reduced as float32 (one process stands in for the
    group: the reduction is recorded, not performed)."""
    reduced = []
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, *a, **k: reduced.append(t.dtype))
    cc = CameraCentering(num_cameras=3, num_slots=1, dim=4).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cc(torch.randn(6, 1, 4, dtype=torch.bfloat16), torch.tensor([0, 1, 2, 0, 1, 2]))
    assert reduced == [torch.float32, torch.float32]
