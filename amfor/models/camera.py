"""Camera centring: remove each camera's mean from the identity features (an AMFOR-project addition).

Why: on the synthetic occluded set the camera (background, colour cast, lighting) dominates the image, and a
model trained from scratch keeps it in its features: with the plain features about 70% of the rank-1 gallery
images were another person seen by the query's camera (docs/model.md, "Camera centring"). Subtracting the
camera's mean feature, as camera-based batch normalisation does for its statistics (Zhuang et al., ECCV 2020),
removes that first-order bias.

The means are running averages over training images (an EMA per camera, updated from each training batch
without gradient), so evaluation is inductive: it needs the camera ids of the test images, not their features.
Training subtracts the same (detached, just updated) means, so the losses see what inference sees. An unknown
camera (camid -1, or camids=None) and a camera the running means have never seen are centred with the mean of the
seen cameras' means (docs/model.md, "Cameras"); they never move the means. Under torch.distributed the per-camera
sums are all-reduced, so every rank holds the means one process with the global batch would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from amfor.models.inputs import check_ids, check_ranges


class CameraCentering(nn.Module):
    """x [B, S, D] (S feature slots, e.g. global + parts), camids [B] -> x - mean[camid] (per slot).

    `update=False` reads the running means without moving them; `slots` (a slice) centres x [B, S', D] with those
    slots' means only (e.g. the global feature alone) and never updates them; `check=False` skips the range
    check of camids (the model checks them once at its entry: it costs a host sync). camids -1 (or None: the
    whole batch) is an unknown camera. momentum: EMA weight of each batch's per-camera mean; a camera's first
    batch sets it.
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

    def forward(self, x: torch.Tensor, camids: torch.Tensor | None, update: bool = True,
                slots: slice | None = None, check: bool = True) -> torch.Tensor:
        mean = self.running_mean if slots is None else self.running_mean[:, slots]
        if x.dim() != 3 or x.shape[1:] != mean.shape[1:]:
            raise ValueError(f"features must be [B, {mean.shape[1]}, {mean.shape[2]}], got {list(x.shape)}")
        if camids is not None:
            check_ids(camids, x.shape[0], "camids")
            if check:
                check_ranges(None, 0, camids, self.num_cameras)
        if self.training and update and slots is None and camids is not None:
            self._update(x.detach(), camids)
        return x - self.lookup(mean, camids, x.shape[0]).to(x.dtype)

    def lookup(self, mean: torch.Tensor, camids: torch.Tensor | None, batch: int) -> torch.Tensor:
        """The means to subtract [B, S, D]: each seen camera's own, else (unknown or unseen) the seen ones' mean."""
        seen = self.seen.to(mean.dtype)
        pooled = (mean * seen[:, None, None]).sum(0) / seen.sum().clamp(min=1)  # [S, D]
        if camids is None:
            return pooled.expand(batch, -1, -1)
        cams = camids.long().clamp(min=0)
        own = (camids >= 0) & self.seen[cams]
        return torch.where(own[:, None, None], mean[cams], pooled)

    @torch.no_grad()
    def _update(self, x: torch.Tensor, camids: torch.Tensor) -> None:
        known = (camids >= 0).to(torch.float32)  # unknown cameras (-1) do not move the means
        onehot = F.one_hot(camids.long().clamp(min=0), self.num_cameras).to(torch.float32) * known[:, None]  # [B, C]
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
