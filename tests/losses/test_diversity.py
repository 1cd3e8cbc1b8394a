"""diversity_loss: orthogonal / identical / hand-computed parts, excluded pairs, errors."""

import math

import pytest
import torch

from amfor.losses import DiversityLoss, diversity_loss
from amfor.losses.diversity import pair_mask

R = 1 / math.sqrt(2)


def test_orthogonal_and_opposite_parts_give_zero():
    parts = torch.eye(4)[None].repeat(2, 1, 1) * torch.tensor([1.0, 2.0, 3.0, 4.0])[:, None]
    assert diversity_loss(parts).item() == 0.0
    opposite = torch.tensor([[[1.0, 0.0], [-2.0, 0.0]]])
    assert diversity_loss(opposite).item() == 0.0  # only positive similarity is penalised


def test_identical_parts_give_one():
    parts = torch.randn(3, 1, 8).repeat(1, 5, 1)
    assert diversity_loss(parts).item() == pytest.approx(1.0, abs=1e-6)


def test_hand_computed_and_excluded_pairs():
    img = torch.tensor([[1.0, 0.0], [R, R], [0.0, 1.0]])  # cos(0,1) = cos(1,2) = R, cos(0,2) = 0
    assert diversity_loss(img[None]).item() == pytest.approx(4 * R / 6, rel=1e-6)
    assert diversity_loss(img[None], exclude_pairs=[(0, 1)]).item() == pytest.approx(2 * R / 4, rel=1e-6)
    assert diversity_loss(img[None], exclude_pairs=[(1, 0), (2, 1)]).item() == pytest.approx(0.0, abs=1e-7)
    same = torch.ones(1, 3, 2)
    batch = torch.cat([img[None], same])  # the batch mean of the two images' losses
    assert diversity_loss(batch).item() == pytest.approx((4 * R / 6 + 1.0) / 2, rel=1e-6)
    assert DiversityLoss([(0, 1)])(batch).item() == pytest.approx((2 * R / 4 + 1.0) / 2, rel=1e-6)


def test_pair_mask():
    keep = pair_mask(4, [(0, 1), (3, 2)])
    assert keep.sum() == 12 - 4 and not keep[1, 0] and not keep[2, 3] and keep[0, 2] and not keep.diagonal().any()


def test_nothing_left_is_connected_zero_and_gradient_flows():
    parts = torch.randn(2, 2, 4, requires_grad=True)
    loss = diversity_loss(parts, exclude_pairs=[(0, 1)])
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(parts.grad, torch.zeros_like(parts))
    parts = (torch.randn(2, 3, 4).abs()).requires_grad_(True)  # positive vectors: positive cosines
    diversity_loss(parts).backward()
    assert parts.grad.abs().sum() > 0


def test_float32_under_autocast():
    parts = torch.randn(2, 3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = diversity_loss(parts.bfloat16())
    assert loss.dtype == torch.float32


def test_errors():
    with pytest.raises(ValueError, match=r"\[B, P, D\]"):
        diversity_loss(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        diversity_loss(torch.randn(2, 3, 4), exclude_pairs=[(0, 3)])
    with pytest.raises(ValueError, match="distinct"):
        diversity_loss(torch.randn(2, 3, 4), exclude_pairs=[(1, 1)])
