"""Reconstruction losses of the HPR-Decoder (docs/spec.md section 5).

Patch level (MAE-style): `patchify` (`amfor.nn.patch_grid`, re-exported here) cuts images into the ViT's
(possibly overlapping) p x p patches, and `patch_reconstruction_loss` is the MSE between predicted and per-patch
normalised target pixels, averaged over the masked patches only. Part level: `feature_reconstruction_loss` is a
(visibility-)weighted mean of per-part MSEs. All in float32 (float64 inputs stay float64) with autocast off.
"""

from __future__ import annotations

import torch
from torch import nn

from amfor.losses.identity import upcast
from amfor.nn.patch_grid import patchify  # noqa: F401  (re-exported: `amfor.losses.patchify` is public API)


def normalize_patches(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalisation of [..., K] pixel vectors: (x - mean) / sqrt(var + eps), var unbiased as MAE."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps).sqrt()


def patch_reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                              norm_pix: bool = True) -> torch.Tensor:
    """MSE of pred [B, N, K] to target [B, N, K] (per-patch normalised if norm_pix), averaged over the patches
    where mask [B, N] (bool, True = masked, to reconstruct) is set; 0 (finite, connected) if none is masked."""
    if pred.dim() != 3 or pred.shape != target.shape:
        raise ValueError(f"pred {list(pred.shape)} and target {list(target.shape)} must both be [B, N, K]")
    if mask.shape != pred.shape[:2] or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor [B, N] = {list(pred.shape[:2])}, got {mask.dtype} "
                         f"{list(mask.shape)}")
    with torch.autocast(pred.device.type, enabled=False):
        target = upcast(target)
        if norm_pix:
            target = normalize_patches(target)
        per_patch = (upcast(pred) - target).pow(2).mean(dim=-1)  # [B, N]
        return (per_patch * mask).sum() / mask.sum().clamp(min=1)


def feature_reconstruction_loss(pred: torch.Tensor, target: torch.Tensor,
                                weight: torch.Tensor | None = None, *, check: bool = True) -> torch.Tensor:
    """Weighted mean over parts of the per-part MSE between pred [B, P, D] and target [B, P, D].

    weight [B, P] (>= 0, e.g. 1 for the parts that were hidden and rebuilt) or None (plain mean); 0 when all
    weights are 0. Pass the target detached when it must not be moved by this loss. check=False skips the check
    that weight is >= 0 (a host sync): for weights the caller made so.
    """
    if pred.dim() != 3 or pred.shape != target.shape:
        raise ValueError(f"pred {list(pred.shape)} and target {list(target.shape)} must both be [B, P, D]")
    if weight is not None and weight.shape != pred.shape[:2]:
        raise ValueError(f"weight must be [B, P] = {list(pred.shape[:2])}, got {list(weight.shape)}")
    if check and weight is not None and bool((weight < 0).any()):
        raise ValueError("weight must be >= 0")
    with torch.autocast(pred.device.type, enabled=False):
        per_part = (upcast(pred) - upcast(target)).pow(2).mean(dim=-1)  # [B, P]
        if weight is None:
            return per_part.mean()
        weight = weight.to(per_part.dtype)
        wsum = weight.sum()
        return (weight * per_part).sum() / torch.where(wsum > 0, wsum, torch.ones_like(wsum))


class PatchReconstructionLoss(nn.Module):
    """`patch_reconstruction_loss` with a fixed norm_pix."""

    def __init__(self, norm_pix: bool = True) -> None:
        super().__init__()
        self.norm_pix = norm_pix

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return patch_reconstruction_loss(pred, target, mask, self.norm_pix)
