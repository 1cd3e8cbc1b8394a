"""Binary focal loss on logits (docs/spec.md section 6: the part visibility head).

FL = alpha_t (1 - p_t)^gamma BCE(logit, target), with p_t the probability of the true label. p_t is taken as
exp(-BCE) (exact for targets in {0, 1}) and 1 - p_t as -expm1(-BCE), so that the loss is as stable as
BCE-with-logits for large logits. Computed in float32 (float64 inputs stay float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from amfor.losses.identity import upcast

REDUCTIONS = ("mean", "sum", "none")


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0, alpha: float | None = None,
               reduction: str = "mean", *, check: bool = True) -> torch.Tensor:
    """Binary focal loss: logits and targets of the same shape (targets 0 or 1); scalar, or that shape for "none".

    gamma 0 and alpha None give BCE-with-logits; alpha weighs positives by alpha and negatives by 1 - alpha.
    check=False skips the check that targets are 0 or 1 (a host sync): for targets the caller made so.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if targets.shape != logits.shape:
        raise ValueError(f"targets {list(targets.shape)} must have the shape of logits {list(logits.shape)}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    logits = upcast(logits)
    targets = targets.to(logits.dtype)
    if check and bool(((targets != 0) & (targets != 1)).any()):
        raise ValueError("targets must be 0 or 1")
    with torch.autocast(logits.device.type, enabled=False):
        ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        loss = ce if gamma == 0 else (-torch.expm1(-ce)).pow(gamma) * ce
        if alpha is not None:
            loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss


class FocalLoss(nn.Module):
    """`focal_loss` with fixed gamma, alpha and reduction."""

    def __init__(self, gamma: float = 2.0, alpha: float | None = None, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.gamma, self.alpha, self.reduction = gamma, alpha, reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return focal_loss(logits, targets, self.gamma, self.alpha, self.reduction)
