"""Parsing supervision of the pixel-to-part classifier (SPEC-AMFOR.md section 4).

`mask_to_tokens` turns a human-parsing mask into one part label per ViT token (the label covering most of the
token's p x p receptive field, on the same ny x nx grid as the overlapping patch embedding); `parsing_loss` is
the label-smoothed cross-entropy of the per-token part logits against those labels, ignoring unlabelled tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from amfor.losses.identity import out_of_range, upcast

IGNORE = -1  # token label: no parsing mask (amfor.data NO_MASK) for its pixels


def mask_to_tokens(mask: torch.Tensor, patch_size: int, stride: int, num_classes: int) -> torch.Tensor:
    """Part label of each token: mask [B, H, W] (integer labels in [0, num_classes), -1 = no mask) -> [B, N].

    N = ny * nx with ny = (H - p) // s + 1 and nx = (W - p) // s + 1, tokens in row-major order (as the ViT
    flattens its grid). Each token gets the label with the largest area in its p x p window (ties: the lower
    label, e.g. background); pixels at -1 do not vote, and a token with no voting pixel (every token of an
    image without a mask, which is -1 everywhere) is -1.
    """
    if mask.dim() != 3 or mask.is_floating_point():
        raise ValueError(f"mask must be an integer tensor [B, H, W], got {mask.dtype} {list(mask.shape)}")
    H, W = mask.shape[-2:]
    if not 0 < stride <= patch_size <= min(H, W):
        raise ValueError(f"need 0 < stride <= patch_size <= min(H, W), got stride {stride}, patch_size "
                         f"{patch_size}, mask {H}x{W}")
    bad = out_of_range(mask, IGNORE, num_classes)
    if bad:
        raise ValueError(f"mask values must lie in [0, {num_classes}) or be -1 (no mask), got [{bad[0]}, {bad[1]}]")
    # count the labels of each token's p x p window with one bincount (no [B, C, H, W] one-hot)
    windows = F.unfold(mask[:, None].float(), kernel_size=patch_size, stride=stride).long()  # [B, p*p, N]
    B, _, N = windows.shape
    token = torch.arange(B * N, device=mask.device).view(B, 1, N)
    valid = windows >= 0
    keys = (token * num_classes + windows.clamp(min=0))[valid]
    counts = torch.bincount(keys, minlength=B * N * num_classes).view(B, N, num_classes)
    return counts.argmax(-1).masked_fill(counts.sum(-1) == 0, IGNORE)  # argmax: the first maximum, lower label


def parsing_loss(token_logits: torch.Tensor, token_targets: torch.Tensor,
                 label_smoothing: float = 0.1) -> torch.Tensor:
    """Cross-entropy (at least float32) of token_logits [B, N, C] against token_targets [B, N] (labels in [0, C), -1
    ignored), averaged over labelled tokens; 0 (finite, connected to the graph) when none is labelled."""
    if token_logits.dim() != 3:
        raise ValueError(f"token_logits must be [B, N, C], got {list(token_logits.shape)}")
    B, N, C = token_logits.shape
    if token_targets.shape != (B, N) or token_targets.is_floating_point():
        raise ValueError(f"token_targets must be an integer tensor [B, N] = [{B}, {N}], got "
                         f"{token_targets.dtype} {list(token_targets.shape)}")
    bad = out_of_range(token_targets, IGNORE, C)
    if bad:
        raise ValueError(f"token_targets must lie in [0, {C}) or be -1 (ignored), got [{bad[0]}, {bad[1]}]")
    targets = token_targets.reshape(-1).long()
    total = F.cross_entropy(upcast(token_logits.reshape(-1, C)), targets, ignore_index=IGNORE,
                            label_smoothing=label_smoothing, reduction="sum")
    return total / (targets != IGNORE).sum().clamp(min=1)


class ParsingLoss(nn.Module):
    """`parsing_loss` with a fixed label smoothing (0.1 as in TSD)."""

    def __init__(self, label_smoothing: float = 0.1) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, token_logits: torch.Tensor, token_targets: torch.Tensor) -> torch.Tensor:
        return parsing_loss(token_logits, token_targets, self.label_smoothing)
