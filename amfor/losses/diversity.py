"""Part diversity loss (docs/spec.md section 6): different parts of one image should not point the same way.

loss = mean over images and over ordered part pairs (i != j), excluded pairs left out, of ReLU(cos(f_i, f_j)):
only positive similarity is penalised. Pairs that are expected to look alike (left / right limbs) can be
excluded. For AMFOR's 8 parts (head, left arm, right arm, torso, left leg, right leg, left foot, right foot;
background excluded) the left/right pairs are ((1, 2), (4, 5), (6, 7)): amfor.data's FLIP_PAIRS minus 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from amfor.losses.identity import upcast


def pair_mask(num_parts: int, exclude_pairs: Sequence[tuple[int, int]] = (), device=None) -> torch.Tensor:
    """[P, P] bool: True for the ordered pairs (i, j), i != j, that count (both orders of an excluded pair not)."""
    keep = ~torch.eye(num_parts, dtype=torch.bool, device=device)
    for pair in exclude_pairs:
        i, j = pair
        if not (0 <= i < num_parts and 0 <= j < num_parts) or i == j:
            raise ValueError(f"exclude_pairs must hold pairs of distinct part indices in [0, {num_parts}), "
                             f"got {tuple(pair)}")
        keep[i, j] = keep[j, i] = False
    return keep


def diversity_loss(parts: torch.Tensor, exclude_pairs: Sequence[tuple[int, int]] = ()) -> torch.Tensor:
    """Mean ReLU cosine similarity between different parts of parts [B, P, D]; scalar (at least float32).

    0 (finite, connected) when no pair is left (P = 1, or every pair excluded).
    """
    if parts.dim() != 3:
        raise ValueError(f"parts must be [B, P, D], got {list(parts.shape)}")
    B, P, _ = parts.shape
    keep = pair_mask(P, exclude_pairs, parts.device)
    with torch.autocast(parts.device.type, enabled=False):
        unit = F.normalize(upcast(parts), dim=-1)
        cos = unit @ unit.transpose(1, 2)  # [B, P, P]
        return (F.relu(cos) * keep).sum() / (B * keep.sum()).clamp(min=1)


class DiversityLoss(nn.Module):
    """`diversity_loss` with fixed excluded pairs."""

    def __init__(self, exclude_pairs: Sequence[tuple[int, int]] = ()) -> None:
        super().__init__()
        self.exclude_pairs = tuple(tuple(p) for p in exclude_pairs)

    def forward(self, parts: torch.Tensor) -> torch.Tensor:
        return diversity_loss(parts, self.exclude_pairs)
