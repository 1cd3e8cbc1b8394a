"""Parsing supervision of the pixel-to-part classifier (docs/spec.md section 4).

`parsing_loss` is the label-smoothed cross-entropy of the per-token part logits against per-token targets,
ignoring unlabelled tokens: one part label per ViT token (`mask_to_tokens`: the label covering most of the token's
p x p window) or the share of every label in that window (`mask_to_token_fractions`: soft targets, a 16x16 token
holds several thin parts). Both live with the patch grid (`amfor.nn.patch_grid`) and are re-exported here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from amfor.losses.identity import upcast
from amfor.nn.patch_grid import (  # noqa: F401  (re-exported: they used to live here)
    IGNORE,
    mask_to_token_fractions,
    mask_to_tokens,
    token_part_counts,
)
from amfor.utils.ranges import out_of_range


def parsing_loss(token_logits: torch.Tensor, token_targets: torch.Tensor,
                 label_smoothing: float = 0.1, *, check: bool = True) -> torch.Tensor:
    """Cross-entropy (at least float32) of token_logits [B, N, C] against the token targets, averaged over the
    labelled tokens; 0 (finite, connected to the graph) when none is labelled.

    token_targets: integer labels [B, N] in [0, C) (-1 ignored), or soft targets [B, N, C] (float, each row a
    distribution over the labels, e.g. `mask_to_token_fractions`; an all-zero row is ignored). check=False skips
    the range check of integer labels (a host sync): for labels the caller made or checked.
    """
    if token_logits.dim() != 3:
        raise ValueError(f"token_logits must be [B, N, C], got {list(token_logits.shape)}")
    B, N, C = token_logits.shape
    if token_targets.is_floating_point():
        return _soft_parsing_loss(token_logits, token_targets, label_smoothing)
    if token_targets.shape != (B, N):
        raise ValueError(f"token_targets must be integer labels [B, N] = [{B}, {N}] or soft targets [B, N, C] = "
                         f"[{B}, {N}, {C}], got {token_targets.dtype} {list(token_targets.shape)}")
    bad = out_of_range(token_targets, IGNORE, C) if check else None
    if bad:
        raise ValueError(f"token_targets must lie in [0, {C}) or be -1 (ignored), got [{bad[0]}, {bad[1]}]")
    targets = token_targets.reshape(-1).long()
    total = F.cross_entropy(upcast(token_logits.reshape(-1, C)), targets, ignore_index=IGNORE,
                            label_smoothing=label_smoothing, reduction="sum")
    return total / (targets != IGNORE).sum().clamp(min=1)


def _soft_parsing_loss(token_logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """parsing_loss for soft targets [B, N, C]: -sum_c t'_c log softmax(logits)_c, t' = (1 - e) t + e / C."""
    if targets.shape != token_logits.shape:
        raise ValueError(f"soft token_targets must be [B, N, C] = {list(token_logits.shape)}, got "
                         f"{list(targets.shape)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
    C = token_logits.shape[-1]
    t = upcast(targets)
    labelled = t.sum(-1) > 0  # [B, N]
    t = (1.0 - label_smoothing) * t + label_smoothing / C * labelled[..., None]
    nll = -(t * upcast(token_logits).log_softmax(-1)).sum(-1)  # [B, N]
    return (nll * labelled).sum() / labelled.sum().clamp(min=1)


class ParsingLoss(nn.Module):
    """`parsing_loss` with a fixed label smoothing (0.1 as in TSD)."""

    def __init__(self, label_smoothing: float = 0.1) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, token_logits: torch.Tensor, token_targets: torch.Tensor) -> torch.Tensor:
        return parsing_loss(token_logits, token_targets, self.label_smoothing)
