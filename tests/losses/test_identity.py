"""identity_loss: cross-entropy with optional label smoothing, pid checks, float32 under autocast."""

import math

import pytest
import torch
import torch.nn.functional as F

from amfor.losses import IdentityLoss, identity_loss


def test_hand_computed():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    pids = torch.tensor([0, 2])
    expect = (-(2.0 - math.log(math.exp(2.0) + 2.0)) + math.log(3.0)) / 2
    assert identity_loss(logits, pids).item() == pytest.approx(expect, rel=1e-6)
    assert IdentityLoss()(logits, pids).item() == pytest.approx(expect, rel=1e-6)


def test_label_smoothing_matches_torch():
    torch.manual_seed(0)
    logits, pids = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    expect = F.cross_entropy(logits, pids, label_smoothing=0.1)
    torch.testing.assert_close(identity_loss(logits, pids, 0.1), expect)
    torch.testing.assert_close(IdentityLoss(0.1)(logits, pids), expect)
    assert identity_loss(logits, pids, 0.1) != identity_loss(logits, pids)


def test_float32_under_autocast():
    torch.manual_seed(0)
    logits = torch.randn(4, 7, requires_grad=True)
    pids = torch.tensor([1, 2, 3, 6])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = identity_loss(logits.bfloat16(), pids)
    assert loss.dtype == torch.float32
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_errors():
    logits = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"\[0, 4\).*\[0, 4\]"):
        identity_loss(logits, torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        identity_loss(logits, torch.tensor([-1, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        identity_loss(logits, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        identity_loss(logits, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[B, C\]"):
        identity_loss(torch.randn(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="label_smoothing"):
        identity_loss(logits, torch.tensor([0, 1, 2]), label_smoothing=1.5)
