"""Batch-hard triplet losses on global features and on parts (docs/spec.md section 6).

For each anchor the hardest positive (farthest same-identity sample, the anchor itself excluded) and the
hardest negative (closest other-identity sample) are mined from the batch; the loss per anchor is the soft
margin softplus(d_ap - d_an) (default) or the hinge max(0, d_ap - d_an + margin). Anchors with no positive
or no negative are left out; with no valid anchor the loss is 0 (finite and still connected to the graph).
Distances are computed in float32 (float64 inputs stay float64), with autocast off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from amfor.losses.identity import check_pids, upcast

EPS = 1e-12  # squared distances are clamped here before the square root: no NaN gradient at distance 0


def euclidean_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances: x [..., B, D], y [..., M, D] -> [..., B, M] (at least float32).

    From |x|^2 + |y|^2 - 2 x.y, clamped at EPS before the square root, so the gradient is 0 (not NaN) for
    coincident points; distances below 1e-6 read as 1e-6.
    """
    x, y = upcast(x), upcast(y)
    d2 = x.pow(2).sum(-1, keepdim=True) + y.pow(2).sum(-1).unsqueeze(-2) - 2 * x @ y.transpose(-1, -2)
    return d2.clamp(min=EPS).sqrt()


def batch_hard_triplet(dist: torch.Tensor, pids: torch.Tensor, margin: float | None = None) -> torch.Tensor:
    """Batch-hard triplet loss from a distance matrix dist [B, B] and pids [B]; scalar (mean over anchors)."""
    B = dist.shape[0]
    same = pids[:, None] == pids[None, :]
    eye = torch.eye(B, dtype=torch.bool, device=dist.device)
    pos, neg = same & ~eye, ~same
    d_ap = dist.masked_fill(~pos, float("-inf")).amax(1)
    d_an = dist.masked_fill(~neg, float("inf")).amin(1)
    valid = pos.any(1) & neg.any(1)
    gap = torch.where(valid, d_ap - d_an, torch.zeros_like(d_ap))  # no inf enters the loss or its gradient
    per_anchor = F.softplus(gap) if margin is None else F.relu(gap + margin)
    return (per_anchor * valid).sum() / valid.sum().clamp(min=1)


def triplet_loss(feats: torch.Tensor, pids: torch.Tensor, margin: float | None = None,
                 normalize: bool = False) -> torch.Tensor:
    """Batch-hard triplet loss on feats [B, D] (L2-normalised first if `normalize`) with pids [B]; scalar.

    margin None: soft margin log(1 + exp(d_ap - d_an)); a float: hinge max(0, d_ap - d_an + margin).
    """
    if feats.dim() != 2:
        raise ValueError(f"feats must be [B, D], got {list(feats.shape)}")
    check_pids(pids, feats.shape[0])
    with torch.autocast(feats.device.type, enabled=False):
        feats = upcast(feats)
        if normalize:
            feats = F.normalize(feats, dim=-1)
        return batch_hard_triplet(euclidean_dist(feats, feats), pids, margin)


def part_distances(parts: torch.Tensor, visibility: torch.Tensor | None = None) -> torch.Tensor:
    """Image-to-image distance [B, B] from parts [B, P, D]: the mean over parts of the per-part distances.

    With visibility [B, P] (in [0, 1], read detached), part p of the pair (i, j) is weighted by
    sqrt(v_ip v_jp); pairs with no co-visible part fall back to the plain mean.
    """
    per_part = euclidean_dist(parts.transpose(0, 1), parts.transpose(0, 1))  # [P, B, B]
    plain = per_part.mean(0)
    if visibility is None:
        return plain
    v = upcast(visibility.detach()).to(parts.dtype).clamp(min=0).t()  # [P, B]
    w = (v[:, :, None] * v[:, None, :]).sqrt()  # [P, B, B]
    wsum = w.sum(0)
    weighted = (w * per_part).sum(0) / torch.where(wsum > EPS, wsum, torch.ones_like(wsum))
    return torch.where(wsum > EPS, weighted, plain)


def part_triplet_loss(parts: torch.Tensor, pids: torch.Tensor, margin: float | None = None,
                      visibility: torch.Tensor | None = None, *, check: bool = True) -> torch.Tensor:
    """Batch-hard triplet loss on parts [B, P, D] with the distance of `part_distances`; scalar.

    check=False skips the check that visibility is >= 0 (a host sync): for weights the caller made so.
    """
    if parts.dim() != 3:
        raise ValueError(f"parts must be [B, P, D], got {list(parts.shape)}")
    B, P, _ = parts.shape
    check_pids(pids, B)
    if visibility is not None and visibility.shape != (B, P):
        raise ValueError(f"visibility must be [B, P] = [{B}, {P}], got {list(visibility.shape)}")
    if check and visibility is not None and bool((visibility < 0).any()):
        raise ValueError("visibility weights must be >= 0")
    with torch.autocast(parts.device.type, enabled=False):
        return batch_hard_triplet(part_distances(upcast(parts), visibility), pids, margin)


class TripletLoss(nn.Module):
    """`triplet_loss` with fixed settings (margin None = soft margin, the AMFOR default)."""

    def __init__(self, margin: float | None = None, normalize: bool = False) -> None:
        super().__init__()
        self.margin, self.normalize = margin, normalize

    def forward(self, feats: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        return triplet_loss(feats, pids, self.margin, self.normalize)


class PartTripletLoss(nn.Module):
    """`part_triplet_loss` with a fixed margin (None = soft margin)."""

    def __init__(self, margin: float | None = None) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, parts: torch.Tensor, pids: torch.Tensor,
                visibility: torch.Tensor | None = None) -> torch.Tensor:
        return part_triplet_loss(parts, pids, self.margin, visibility)
