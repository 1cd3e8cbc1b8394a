"""Identity (ID) loss: cross-entropy of classifier logits against the identity labels (docs/spec.md section 6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from amfor.utils.ranges import out_of_range


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Accumulation dtype: half and bfloat16 tensors as float32, float32 and float64 as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def check_pids(pids: torch.Tensor, batch: int, name: str = "pids") -> None:
    """pids must be an integer tensor of shape [batch]."""
    if not isinstance(pids, torch.Tensor) or pids.shape != (batch,) or pids.is_floating_point() or pids.is_complex():
        raise ValueError(f"{name} must be an integer tensor of shape [{batch}], got "
                         f"{getattr(pids, 'dtype', type(pids).__name__)} {list(getattr(pids, 'shape', []))}")


def identity_loss(logits: torch.Tensor, pids: torch.Tensor, label_smoothing: float = 0.0, *,
                  check: bool = True) -> torch.Tensor:
    """Mean cross-entropy (at least float32) of logits [B, C] against pids [B] with values in [0, C); scalar.

    check=False skips the range check of pids (a host sync): for a caller that checked them already.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, C], got {list(logits.shape)}")
    B, C = logits.shape
    check_pids(pids, B)
    bad = out_of_range(pids, 0, C) if check else None
    if bad:
        raise ValueError(f"pids must lie in [0, {C}) (the classifier's {C} classes), got values in "
                         f"[{bad[0]}, {bad[1]}]")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
    return F.cross_entropy(upcast(logits), pids.long(), label_smoothing=label_smoothing)


class IdentityLoss(nn.Module):
    """`identity_loss` with a fixed label smoothing (0 in the logged AMFOR run)."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        return identity_loss(logits, pids, self.label_smoothing)
