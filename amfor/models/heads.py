"""BNNeck heads (docs/spec.md section 6): BatchNorm with a frozen zero bias, then a bias-free classifier.

The triplet loss reads the feature before the BN, the identity loss the logits after it, and inference the
BN output (L2-normalised): the BNNeck of "Bag of Tricks" (Luo et al.) as TransReID and TSD use it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BNNeck(nn.Module):
    """dim -> BN -> Linear(num_classes, bias=False) (init std 0.001; nn.Identity for num_classes = 0, as timm's
    heads). forward: [B, dim] -> (bn_feat, logits)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        self.bn.bias.requires_grad_(False)
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)
        self.reset_classifier(num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        """A new classifier for `num_classes` identities (the BN is kept), on the BN's device."""
        if num_classes == 0:
            self.classifier = nn.Identity()
            return
        self.classifier = nn.Linear(self.bn.num_features, num_classes, bias=False, device=self.bn.weight.device)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, x: torch.Tensor, track: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """track=False (training only): normalise with the batch's statistics but leave the running ones alone, for
        an auxiliary input (a teacher pass, rebuilt parts) that shares the classifier but is not what inference
        normalises: otherwise its statistics leak into the running ones inference uses."""
        feat = self.bn(x) if track or not self.training else batch_norm_untracked(self.bn, x)
        return feat, self.classifier(feat)


def batch_norm_untracked(bn: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    """`bn` in training mode (batch statistics, its affine weight and bias) without updating its running statistics
    (and without SyncBatchNorm's cross-rank reduction: local batch statistics)."""
    return F.batch_norm(x, None, None, bn.weight, bn.bias, training=True, momentum=0.0, eps=bn.eps)


class PartNecks(nn.Module):
    """P BNNecks applied to P part features at once: [B, P, dim] -> (bn_feats [B, P, dim], logits [P, B, C]).

    The logits come out granularity-first, the layout `distill_kl_loss` takes, with no copy.
    """

    def __init__(self, num_parts: int, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(num_parts * dim)
        self.bn.bias.requires_grad_(False)
        self.num_parts, self.dim = num_parts, dim
        self.reset_classifier(num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        """New classifiers [P, num_classes, dim] (0: none, the logits are [P, B, 0]), on the BN's device."""
        device = self.bn.weight.device
        self.weight = nn.Parameter(torch.randn(self.num_parts, num_classes, self.dim, device=device) * 0.001)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, P, D = x.shape
        feat = self.bn(x.reshape(B, P * D)).view(B, P, D)
        return feat, torch.einsum("bpd,pcd->pbc", feat, self.weight.to(feat.dtype))
