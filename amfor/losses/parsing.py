"""Parsing supervision of the pixel-to-part classifier (docs/spec.md section 4).

`mask_to_tokens` turns a human-parsing mask into one part label per ViT token (the label covering most of the
token's p x p receptive field, on the same ny x nx grid as the overlapping patch embedding), and
`mask_to_token_fractions` into the share of every label in that field (soft targets: a 16x16 token holds
several thin parts); `parsing_loss` is the label-smoothed cross-entropy of the per-token part logits against
either, ignoring unlabelled tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from amfor.losses.identity import out_of_range, upcast
from amfor.losses.reconstruction import patchify

IGNORE = -1  # token label: no parsing mask (amfor.data NO_MASK) for its pixels


def token_part_counts(mask: torch.Tensor, patch_size: int, stride: int, num_classes: int, *,
                      check: bool = True) -> torch.Tensor:
    """Pixels of each label in each token's p x p window: mask [B, H, W] (integer labels in [0, num_classes),
    -1 = no mask) -> counts [B, N, num_classes] (float32; -1 pixels are not counted). check=False skips the
    range check of the labels (a host sync): for masks the caller checked already.

    N = ny * nx with ny = (H - p) // s + 1 and nx = (W - p) // s + 1, tokens in row-major order (as the ViT
    flattens its grid). One index_add, no [B, C, H, W] one-hot.
    """
    if mask.dim() != 3 or mask.is_floating_point():
        raise ValueError(f"mask must be an integer tensor [B, H, W], got {mask.dtype} {list(mask.shape)}")
    H, W = mask.shape[-2:]
    if not 0 < stride <= patch_size <= min(H, W):
        raise ValueError(f"need 0 < stride <= patch_size <= min(H, W), got stride {stride}, patch_size "
                         f"{patch_size}, mask {H}x{W}")
    bad = out_of_range(mask, IGNORE, num_classes) if check else None
    if bad:
        raise ValueError(f"mask values must lie in [0, {num_classes}) or be -1 (no mask), got [{bad[0]}, {bad[1]}]")
    windows = patchify(mask[:, None], patch_size, stride)  # [B, N, p*p] labels
    B, N, _ = windows.shape
    token = torch.arange(B * N, device=mask.device).view(B, N, 1)
    keys = token * num_classes + windows.clamp(min=0)
    valid = (windows >= 0).float()  # -1 pixels add 0 (a weight, not a boolean selection: no host sync)
    counts = torch.zeros(B * N * num_classes, device=mask.device).index_add_(0, keys.flatten(), valid.flatten())
    return counts.view(B, N, num_classes)


def mask_to_tokens(mask: torch.Tensor, patch_size: int, stride: int, num_classes: int, *,
                   check: bool = True) -> torch.Tensor:
    """Part label of each token (majority vote): mask [B, H, W] -> [B, N] (see `token_part_counts`).

    Each token gets the label with the largest area in its window (ties: the lower label, e.g. background); a
    token with no labelled pixel (every token of an image without a mask, which is -1 everywhere) is -1.
    Thin parts (arms, feet at 16x16 patches) rarely win a vote: `mask_to_token_fractions` keeps them.
    """
    counts = token_part_counts(mask, patch_size, stride, num_classes, check=check)
    return counts.argmax(-1).masked_fill(counts.sum(-1) == 0, IGNORE)  # argmax: the first maximum, lower label


def mask_to_token_fractions(mask: torch.Tensor, patch_size: int, stride: int, num_classes: int, *,
                            check: bool = True) -> torch.Tensor:
    """Share of each label in each token's window: mask [B, H, W] -> [B, N, num_classes] float32, rows summing
    to 1, or all 0 for a token with no labelled pixel (see `token_part_counts`)."""
    counts = token_part_counts(mask, patch_size, stride, num_classes, check=check)
    return counts / counts.sum(-1, keepdim=True).clamp(min=1)


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
