"""Patch dropout / MAE random masking for any timm ViT, on the fused masked_gather op."""

from __future__ import annotations

import torch
from torch import nn

from amfor.ops import masked_gather, random_masking


class PatchDropout(nn.Module):
    """Keep a random (or lowest-scoring) subset of patch tokens per image; prefix tokens (CLS, registers) stay.

    A drop-in for timm's `PatchDropout` (`vit.patch_drop`, applied after the position embedding was added):
    the prefix tokens and the kept patches are gathered in one pass, in ascending order, with no `cat`.
    `return_indices=True` also returns the kept patch indices [B, K] (patch numbering, prefix excluded), which
    `masked_scatter` takes to put the encoder output back on the grid, as MAE's decoder does.

    x: [B, P + N, D]  ->  [B, P + K, D] with K = max(1, int(N * (1 - prob))) while training; x unchanged in eval.
    `scores` [B, N] (e.g. the occluded fraction of each patch) keeps the K lowest-scoring patches instead.
    """

    def __init__(self, prob: float = 0.5, num_prefix_tokens: int = 1, ordered: bool = True,
                 return_indices: bool = False) -> None:
        super().__init__()
        if not 0.0 <= prob < 1.0:
            raise ValueError(f"prob must lie in [0, 1), got {prob}")
        self.prob = prob
        self.num_prefix_tokens = num_prefix_tokens
        self.ordered = ordered  # kept patches are always in ascending order; accepted for timm compatibility
        self.return_indices = return_indices

    def forward(self, x: torch.Tensor, scores: torch.Tensor | None = None):
        if not self.training or self.prob == 0.0:
            return (x, None) if self.return_indices else x
        B, L, _ = x.shape
        P = self.num_prefix_tokens
        N = L - P
        keep = max(1, int(N * (1.0 - self.prob)))
        index, _ = random_masking(B, N, keep, scores=scores, device=x.device)
        prefix = torch.arange(P, device=x.device).expand(B, P)
        out = masked_gather(x, torch.cat([prefix, index + P], dim=1), check_index=False)
        return (out, index) if self.return_indices else out

    def extra_repr(self) -> str:
        return f"prob={self.prob}, num_prefix_tokens={self.num_prefix_tokens}"


def apply_patch_dropout(vit: nn.Module, prob: float) -> nn.Module:
    """Give a timm VisionTransformer (anything with `patch_drop` and `num_prefix_tokens`) our PatchDropout."""
    if not hasattr(vit, "patch_drop"):
        raise TypeError(f"{type(vit).__name__} has no `patch_drop` attribute: not a timm VisionTransformer")
    vit.patch_drop = PatchDropout(prob, num_prefix_tokens=getattr(vit, "num_prefix_tokens", 1))
    return vit
