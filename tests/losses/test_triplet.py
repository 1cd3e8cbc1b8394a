"""Batch-hard triplet losses: hand-computed distances, left-out anchors, gradients, part distances."""

import pytest
import torch
import torch.nn.functional as F

from amfor.losses import PartTripletLoss, TripletLoss, part_triplet_loss, triplet_loss
from amfor.losses.triplet import euclidean_dist, part_distances

# four points on a line: d01 = 1, d02 = 3, d03 = 7, d12 = 2, d13 = 6, d23 = 4
POINTS = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [7.0, 0.0]])
PIDS = torch.tensor([0, 0, 1, 1])
GAPS = torch.tensor([1.0 - 3.0, 1.0 - 2.0, 4.0 - 2.0, 4.0 - 6.0])  # hardest positive - hardest negative


def test_distances():
    d = euclidean_dist(POINTS, POINTS)
    expect = (POINTS[:, None] - POINTS[None]).norm(dim=-1)
    torch.testing.assert_close(d, expect.clamp(min=1e-6), atol=1e-5, rtol=0)


def test_soft_margin_hand_computed():
    expect = F.softplus(GAPS).mean()
    torch.testing.assert_close(triplet_loss(POINTS, PIDS), expect)
    torch.testing.assert_close(TripletLoss()(POINTS, PIDS), expect)
    assert expect.item() == pytest.approx(((1 + torch.exp(GAPS)).log().mean()).item(), rel=1e-6)


def test_hinge_hand_computed():
    assert triplet_loss(POINTS, PIDS, margin=0.3).item() == pytest.approx(2.3 / 4, rel=1e-5)
    assert TripletLoss(margin=3.0)(POINTS, PIDS).item() == pytest.approx((1 + 2 + 5 + 1) / 4, rel=1e-5)


def test_anchors_without_positive_are_left_out():
    pids = torch.tensor([0, 0, 1, 2])  # anchors 2 and 3 have no positive
    expect = F.softplus(torch.tensor([1.0 - 3.0, 1.0 - 2.0])).mean()
    torch.testing.assert_close(triplet_loss(POINTS, pids), expect)


@pytest.mark.parametrize("pids", [[0, 1, 2, 3], [5, 5, 5, 5]])  # no positive anywhere / no negative anywhere
def test_no_valid_anchor_gives_connected_zero(pids):
    feats = POINTS.clone().requires_grad_(True)
    loss = triplet_loss(feats, torch.tensor(pids))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(feats.grad, torch.zeros_like(feats))
    parts = POINTS[:, None].repeat(1, 3, 1).requires_grad_(True)
    loss = part_triplet_loss(parts, torch.tensor(pids))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(parts.grad, torch.zeros_like(parts))


def test_no_nan_gradient_at_zero_distance():
    feats = torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [0.0, 5.0]], requires_grad=True)
    loss = triplet_loss(feats, torch.tensor([0, 0, 1, 1]), margin=0.3)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(feats.grad).all()


def test_normalize():
    torch.manual_seed(0)
    feats, pids = torch.randn(8, 5), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    torch.testing.assert_close(triplet_loss(feats, pids, normalize=True),
                               triplet_loss(F.normalize(feats, dim=-1), pids))
    torch.testing.assert_close(TripletLoss(normalize=True)(3 * feats, pids), triplet_loss(feats, pids, normalize=True))


def test_gradcheck_float64():
    torch.manual_seed(0)
    feats = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    pids = torch.tensor([0, 0, 1, 1, 2, 2])
    assert torch.autograd.gradcheck(lambda f: triplet_loss(f, pids), (feats,))
    assert torch.autograd.gradcheck(lambda f: triplet_loss(f, pids, margin=5.0, normalize=True), (feats,))
    parts = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    vis = torch.rand(6, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: part_triplet_loss(p, pids), (parts,))
    assert torch.autograd.gradcheck(lambda p: part_triplet_loss(p, pids, margin=5.0, visibility=vis), (parts,))


def test_part_distance_is_mean_of_part_distances():
    torch.manual_seed(0)
    parts = torch.randn(5, 3, 4)
    brute = torch.stack([(parts[:, None, p] - parts[None, :, p]).norm(dim=-1) for p in range(3)]).mean(0)
    torch.testing.assert_close(part_distances(parts), brute.fill_diagonal_(1e-6), atol=1e-5, rtol=0)


def test_part_distance_with_visibility():
    torch.manual_seed(0)
    parts = torch.randn(3, 2, 4)
    vis = torch.tensor([[1.0, 0.0], [0.25, 1.0], [0.0, 1.0]])  # images 0 and 2 share no visible part
    d = part_distances(parts, vis)
    per = [(parts[i, :] - parts[j, :]).norm(dim=-1) for i, j in [(0, 1), (1, 2), (0, 2)]]
    w01 = torch.tensor([0.5, 0.0])  # sqrt(1 * 0.25), sqrt(0 * 1)
    w12 = torch.tensor([0.0, 1.0])
    torch.testing.assert_close(d[0, 1], (w01 * per[0]).sum() / w01.sum())
    torch.testing.assert_close(d[1, 2], (w12 * per[1]).sum() / w12.sum())
    torch.testing.assert_close(d[0, 2], per[2].mean())  # the plain-mean fallback
    torch.testing.assert_close(d, d.t())


def test_part_triplet_hand_computed():
    # two parts: part 0 repeats POINTS, part 1 is POINTS scaled by 3 -> part distance = 2 x point distance
    parts = torch.stack([POINTS, 3 * POINTS], dim=1)
    expect = F.softplus(2 * GAPS).mean()
    torch.testing.assert_close(part_triplet_loss(parts, PIDS), expect)
    torch.testing.assert_close(PartTripletLoss()(parts, PIDS), expect)
    vis = torch.tensor([[1.0, 0.0]] * 4)  # only part 0 visible -> the point distances
    torch.testing.assert_close(part_triplet_loss(parts, PIDS, visibility=vis), F.softplus(GAPS).mean())
    assert PartTripletLoss(margin=0.5)(parts, PIDS, vis).item() == pytest.approx(2.5 / 4, rel=1e-5)


def test_float32_under_autocast():
    torch.manual_seed(0)
    feats, pids = torch.randn(8, 16), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = triplet_loss(feats, pids)
        part = part_triplet_loss(feats.view(8, 2, 8), pids)
    assert loss.dtype == part.dtype == torch.float32
    torch.testing.assert_close(loss, triplet_loss(feats, pids))
    torch.testing.assert_close(part, part_triplet_loss(feats.view(8, 2, 8), pids))


def test_errors():
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        triplet_loss(torch.randn(4, 2, 3), PIDS)
    with pytest.raises(ValueError, match=r"shape \[4\]"):
        triplet_loss(POINTS, torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="integer"):
        triplet_loss(POINTS, PIDS.float())
    with pytest.raises(ValueError, match=r"\[B, P, D\]"):
        part_triplet_loss(POINTS, PIDS)
    with pytest.raises(ValueError, match=r"visibility must be \[B, P\]"):
        part_triplet_loss(torch.randn(4, 2, 3), PIDS, visibility=torch.ones(4, 3))
    with pytest.raises(ValueError, match=">= 0"):
        part_triplet_loss(torch.randn(4, 2, 3), PIDS, visibility=-torch.ones(4, 2))
