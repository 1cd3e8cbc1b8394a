"""patchify (overlapping strides, channel order), patch and feature reconstruction losses, gradcheck, errors."""

import pytest
import torch
import torch.nn.functional as F

from amfor.losses import PatchReconstructionLoss, feature_reconstruction_loss, patch_reconstruction_loss, patchify
from amfor.losses.reconstruction import normalize_patches


@pytest.mark.parametrize("p, s", [(8, 8), (8, 5), (6, 3)])
def test_patchify_layout(p, s):
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 40, 24)
    patches = patchify(imgs, p, s)
    ny, nx = (40 - p) // s + 1, (24 - p) // s + 1
    assert patches.shape == (2, ny * nx, 3 * p * p)
    for n in (0, nx + 1, ny * nx - 1):
        r, c = divmod(n, nx)  # row-major tokens
        window = imgs[:, :, r * s:r * s + p, c * s:c * s + p]  # [B, C, p, p]: channel-major vectors
        torch.testing.assert_close(patches[:, n], window.reshape(2, -1), atol=0, rtol=0)


@pytest.mark.parametrize("p, s", [(16, 16), (16, 11), (8, 5)])
def test_patchify_is_f_unfold_and_takes_integer_masks(p, s):
    torch.manual_seed(0)
    imgs = torch.randn(3, 3, 64, 32)
    expected = F.unfold(imgs, kernel_size=p, stride=s).transpose(1, 2)
    assert torch.equal(patchify(imgs, p, s), expected)
    mask = torch.randint(-1, 9, (3, 64, 32))
    labels = patchify(mask[:, None], p, s)  # the parsing loss's use: F.unfold itself takes no integers
    assert labels.dtype == mask.dtype
    assert torch.equal(labels, F.unfold(mask[:, None].float(), kernel_size=p, stride=s).transpose(1, 2).long())


def test_patchify_at_256x128():
    assert patchify(torch.zeros(1, 3, 256, 128), 16, 11).shape == (1, 242, 768)
    assert patchify(torch.zeros(1, 3, 256, 128), 16, 16).shape == (1, 128, 768)


def test_patch_loss_without_normalisation():
    pred = torch.zeros(1, 3, 4)
    target = torch.tensor([[[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 0.0], [3.0, 3.0, 3.0, 3.0]]])
    mask = torch.tensor([[True, True, False]])
    # per-patch MSE 1.0, 1.0, 9.0; only the first two are masked
    assert patch_reconstruction_loss(pred, target, mask, norm_pix=False).item() == pytest.approx(1.0)
    assert PatchReconstructionLoss(norm_pix=False)(pred, target, torch.ones(1, 3, dtype=torch.bool)).item() == (
        pytest.approx(11.0 / 3))


def test_patch_loss_with_normalisation():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 6, 12), 5 + 3 * torch.randn(2, 6, 12)
    mask = torch.rand(2, 6) > 0.4
    mean, var = target.mean(-1, keepdim=True), target.var(-1, unbiased=True, keepdim=True)
    norm = (target - mean) / (var + 1e-6) ** 0.5
    expect = F.mse_loss(pred[mask], norm[mask])
    torch.testing.assert_close(patch_reconstruction_loss(pred, target, mask), expect)
    torch.testing.assert_close(normalize_patches(target), norm)
    assert normalize_patches(torch.full((1, 4), 7.0)).abs().max() == 0  # flat patch: finite


def test_patch_loss_nothing_masked():
    pred = torch.randn(2, 6, 12, requires_grad=True)
    loss = patch_reconstruction_loss(pred, torch.randn(2, 6, 12), torch.zeros(2, 6, dtype=torch.bool))
    assert loss.item() == 0.0 and torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))


def test_feature_loss():
    pred = torch.zeros(1, 3, 2)
    target = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [0.0, 0.0]]])  # per-part MSE 1, 4, 0
    assert feature_reconstruction_loss(pred, target).item() == pytest.approx(5.0 / 3)
    weight = torch.tensor([[1.0, 0.5, 0.0]])
    assert feature_reconstruction_loss(pred, target, weight).item() == pytest.approx(3.0 / 1.5)
    zero = torch.zeros(1, 3)
    pred.requires_grad_(True)
    loss = feature_reconstruction_loss(pred, target, zero)
    assert loss.item() == 0.0 and loss.requires_grad


def test_gradcheck_float64():
    torch.manual_seed(0)
    pred = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, True, True, False], [False, False, True, False, True]])
    for norm_pix in (True, False):
        loss = lambda a, b, n=norm_pix: patch_reconstruction_loss(a, b, mask, n)
        assert torch.autograd.gradcheck(loss, (pred, target))
    weight = torch.rand(2, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: feature_reconstruction_loss(a, b, weight), (pred, target))
    assert torch.autograd.gradcheck(lambda a, b: feature_reconstruction_loss(a, b), (pred, target))
    imgs = torch.randn(1, 2, 10, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: patchify(x, 4, 3), (imgs,))


def test_float32_under_autocast():
    pred, target = torch.randn(2, 5, 6), torch.randn(2, 5, 6)
    mask = torch.ones(2, 5, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = patch_reconstruction_loss(pred.bfloat16(), target, mask)
        b = feature_reconstruction_loss(pred.bfloat16(), target.bfloat16())
    assert a.dtype == b.dtype == torch.float32


def test_errors():
    x = torch.randn(2, 5, 6)
    with pytest.raises(ValueError, match=r"\[B, N, K\]"):
        patch_reconstruction_loss(x, x[:, :4], torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        patch_reconstruction_loss(x, x, torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"\[2, 5\]"):
        patch_reconstruction_loss(x, x, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[B, P, D\]"):
        feature_reconstruction_loss(x, x[0])
    with pytest.raises(ValueError, match=r"weight must be \[B, P\]"):
        feature_reconstruction_loss(x, x, torch.ones(5))
    with pytest.raises(ValueError, match=">= 0"):
        feature_reconstruction_loss(x, x, -torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        patchify(torch.zeros(3, 8, 8), 4, 4)
    with pytest.raises(ValueError, match="stride"):
        patchify(torch.zeros(1, 3, 8, 8), 4, 5)
