"""focal_loss: BCE at gamma 0, hand-computed values, alpha, stability, reductions, errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from amfor.losses import FocalLoss, focal_loss


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gamma_zero_is_bce(reduction):
    torch.manual_seed(0)
    logits, targets = torch.randn(5, 8), (torch.rand(5, 8) > 0.5).float()
    expect = F.binary_cross_entropy_with_logits(logits, targets, reduction=reduction)
    torch.testing.assert_close(focal_loss(logits, targets, gamma=0.0, reduction=reduction), expect)
    torch.testing.assert_close(FocalLoss(gamma=0.0, reduction=reduction)(logits, targets), expect)


def test_hand_computed():
    logits = torch.tensor([0.0, 0.0, math.log(3.0)])  # p = 0.5, 0.5, 0.75
    targets = torch.tensor([1.0, 0.0, 1.0])
    expect = torch.tensor([0.25 * math.log(2), 0.25 * math.log(2), 0.0625 * -math.log(0.75)])
    torch.testing.assert_close(focal_loss(logits, targets, reduction="none"), expect)
    torch.testing.assert_close(focal_loss(logits, targets), expect.mean())
    alpha_t = torch.tensor([0.25, 0.75, 0.25])
    torch.testing.assert_close(focal_loss(logits, targets, alpha=0.25, reduction="sum"), (alpha_t * expect).sum())


def test_matches_the_textbook_formula():
    torch.manual_seed(1)
    logits, targets = 3 * torch.randn(64), (torch.rand(64) > 0.3).float()
    p = torch.sigmoid(logits)
    p_t = p * targets + (1 - p) * (1 - targets)
    expect = -(1 - p_t).pow(1.5) * p_t.log()
    torch.testing.assert_close(focal_loss(logits, targets, gamma=1.5, reduction="none"), expect, atol=1e-6, rtol=1e-5)


def test_stable_for_large_logits():
    logits = torch.tensor([100.0, -100.0, 100.0, -100.0, 30.0], requires_grad=True)
    targets = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    loss = focal_loss(logits, targets, reduction="none")
    assert torch.isfinite(loss).all()
    assert loss[2].item() == pytest.approx(100.0, rel=1e-4) and loss[0].item() == 0.0
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_float32_under_autocast_and_bool_targets():
    logits = torch.randn(4, 3).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = focal_loss(logits, torch.rand(4, 3) > 0.5)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_errors():
    logits = torch.zeros(4)
    with pytest.raises(ValueError, match="shape"):
        focal_loss(logits, torch.zeros(3))
    with pytest.raises(ValueError, match="0 or 1"):
        focal_loss(logits, torch.full((4,), 0.5))
    with pytest.raises(ValueError, match="reduction"):
        focal_loss(logits, torch.zeros(4), reduction="avg")
    with pytest.raises(ValueError, match="alpha"):
        focal_loss(logits, torch.zeros(4), alpha=1.5)
    with pytest.raises(ValueError, match="gamma"):
        focal_loss(logits, torch.zeros(4), gamma=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        FocalLoss(reduction="batchmean")
