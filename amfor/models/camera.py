"""Camera centring: remove each camera's mean from the identity features (an AMFOR-project addition).

Why: on the synthetic occluded set the camera (background, colour cast, lighting) dominates the image, and a
model trained from scratch keeps it in its features: with the plain features about 70% of the rank-1 gallery
images were another person seen by the query's camera (docs/model.md, "Camera centring"). Subtracting the
camera's mean feature, as camera-based batch normalisation does for its statistics (Zhuang et al., ECCV 2020),
removes that first-order bias.

The means are running averages over training images (an EMA per camera, updated from each training batch
without gradient), so evaluation is inductive: it needs the camera ids of the test images, not their features.
Training subtracts the same (detached, just updated) means, so the losses see what inference sees. A camera the
running means have never seen is left uncentred. Under torch.distributed the per-camera sums are all-reduced, so
every rank holds the means one process with the global batch would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from amfor.losses.identity import out_of_range
from amfor.models.backbone import tracing


class CameraCentering(nn.Module):
    """x [B, S, D] (S feature slots, e.g. global + parts), camids [B] -> x - mean[camid] (per slot).

    `update=False` reads the running means without moving them; `slots` (a slice) centres x [B, S', D] with those
    slots' means only (e.g. the global feature alone) and never updates them; `check=False` skips the range
    check of camids (already checked in this step: it costs a host sync). momentum: EMA weight of each
    batch's per-camera mean; a camera's first batch sets it.
    """

    def __init__(self, num_cameras: int, num_slots: int, dim: int, momentum: float = 0.1) -> None:
        super().__init__()
        if num_cameras < 1:
            raise ValueError(f"camera centring needs the cameras' count (num_cameras >= 1), got {num_cameras}")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must lie in (0, 1], got {momentum}")
        self.num_cameras, self.num_slots, self.momentum = num_cameras, num_slots, momentum
        self.register_buffer("running_mean", torch.zeros(num_cameras, num_slots, dim))
        self.register_buffer("seen", torch.zeros(num_cameras, dtype=torch.bool))

    def forward(self, x: torch.Tensor, camids: torch.Tensor, update: bool = True, slots: slice | None = None,
                check: bool = True) -> torch.Tensor:
        mean = self.running_mean if slots is None else self.running_mean[:, slots]
        if x.dim() != 3 or x.shape[1:] != mean.shape[1:]:
            raise ValueError(f"features must be [B, {mean.shape[1]}, {mean.shape[2]}], got {list(x.shape)}")
        if camids is None or camids.shape != (x.shape[0],) or camids.is_floating_point():
            raise ValueError(f"camera centring needs integer camids of shape [{x.shape[0]}], got "
                             f"{getattr(camids, 'dtype', None)} {list(getattr(camids, 'shape', []))}")
        bad = None if tracing() or not check else out_of_range(camids, 0, self.num_cameras)  # one host sync
        if bad:
            raise ValueError(f"camids must lie in [0, {self.num_cameras}), got values in [{bad[0]}, {bad[1]}]")
        camids = camids.long()
        if self.training and update and slots is None:
            self._update(x.detach(), camids)
        return x - mean[camids].to(x.dtype)

    @torch.no_grad()
    def _update(self, x: torch.Tensor, camids: torch.Tensor) -> None:
        onehot = F.one_hot(camids, self.num_cameras).to(torch.float32)  # [B, C]
        counts = onehot.sum(0)  # [C]
        with torch.autocast(x.device.type, enabled=False):  # autocast would sum (and all-reduce) in bf16/fp16
            sums = torch.einsum("bc,bsd->csd", onehot, x.float())
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
            torch.distributed.all_reduce(counts)
        means = sums / counts.clamp(min=1)[:, None, None]
        present = (counts > 0)[:, None, None]
        weight = torch.where(self.seen[:, None, None], self.momentum, 1.0)
        blended = self.running_mean + weight * (means - self.running_mean)
        self.running_mean.copy_(torch.where(present, blended, self.running_mean))
        self.seen |= counts > 0
