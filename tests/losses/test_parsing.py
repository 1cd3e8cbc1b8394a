"""mask_to_tokens and mask_to_token_fractions on drawn masks (stride 16 and an overlapping stride), parsing_loss
with hard and soft targets, errors."""

import pytest
import torch
import torch.nn.functional as F

from amfor.data import NO_MASK
from amfor.losses import ParsingLoss, mask_to_token_fractions, mask_to_tokens, parsing_loss
from amfor.losses.parsing import IGNORE


def brute_force_tokens(mask, p, s, num_classes):
    """Majority label per window by counting, the lowest label on ties, -1 for windows without labels."""
    B, H, W = mask.shape
    ny, nx = (H - p) // s + 1, (W - p) // s + 1
    out = torch.full((B, ny * nx), -1, dtype=torch.long)
    for b in range(B):
        for r in range(ny):
            for c in range(nx):
                win = mask[b, r * s:r * s + p, c * s:c * s + p].flatten()
                counts = torch.bincount(win[win >= 0], minlength=num_classes)
                if counts.sum() > 0:
                    out[b, r * nx + c] = int(counts.argmax())
    return out


def test_ignore_is_no_mask():
    assert IGNORE == NO_MASK == -1


def test_drawn_mask_stride_16():
    mask = torch.zeros(1, 32, 32, dtype=torch.long)
    mask[0, :16, :16] = 1  # top-left window: all head
    mask[0, :16, 16:] = 4
    mask[0, :6, 16:] = 2  # top-right: 6 rows arm (96 px) vs 10 rows torso (160 px) -> torso
    mask[0, 16:, :10] = 5  # bottom-left: 10 columns leg (160 px) vs background (96 px) -> leg
    # bottom-right: background
    assert mask_to_tokens(mask, 16, 16, 9).tolist() == [[1, 4, 5, 0]]


def test_drawn_mask_overlapping_stride():
    mask = torch.ones(1, 32, 32, dtype=torch.long)
    mask[0, :, 14:] = 2
    mask[0, 20:, :] = 3
    # windows rows/cols [0,16), [8,24), [16,32): 3 x 3 tokens
    expect = [[1, 2, 2],
              [1, 2, 2],
              [3, 3, 3]]
    tokens = mask_to_tokens(mask, patch_size=16, stride=8, num_classes=4)
    assert tokens.shape == (1, 9) and tokens.view(3, 3).tolist() == expect


def test_ties_go_to_the_lower_label():
    mask = torch.zeros(1, 16, 16, dtype=torch.long)
    mask[0, :, 8:] = 3  # 128 px background, 128 px label 3
    assert mask_to_tokens(mask, 16, 16, 4).tolist() == [[0]]


@pytest.mark.parametrize("stride, n", [(16, 128), (12, 210), (11, 242)])
def test_random_masks_match_brute_force_at_256x128(stride, n):
    g = torch.Generator().manual_seed(stride)
    coarse = torch.randint(0, 9, (2, 16, 8), generator=g)
    mask = F.interpolate(coarse[:, None].float(), size=(256, 128), mode="nearest")[:, 0].long()
    mask[:, 100:140, 30:90] = torch.randint(0, 9, (2, 40, 60), generator=g)  # fine-grained noise
    tokens = mask_to_tokens(mask, 16, stride, 9)
    assert tokens.shape == (2, n) and tokens.dtype == torch.long
    assert torch.equal(tokens, brute_force_tokens(mask, 16, stride, 9))


def test_images_without_mask_and_unlabelled_pixels():
    mask = torch.zeros(3, 32, 32, dtype=torch.long)
    mask[0, :, 16:] = 2
    mask[1] = NO_MASK  # this image has no parsing mask
    mask[2, :16, :16] = NO_MASK  # a window with no labelled pixel
    mask[2, 16:, :16] = NO_MASK
    mask[2, 16:, :4] = 6  # only 64 labelled pixels in the window, but they win
    tokens = mask_to_tokens(mask, 16, 16, 9)
    assert tokens[0].tolist() == [0, 2, 0, 2]
    assert tokens[1].tolist() == [-1, -1, -1, -1]
    assert tokens[2].tolist() == [-1, 0, 6, 0]


def test_mask_errors():
    mask = torch.zeros(2, 32, 32, dtype=torch.long)
    with pytest.raises(ValueError, match="integer"):
        mask_to_tokens(mask.float(), 16, 16, 9)
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        mask_to_tokens(mask[0], 16, 16, 9)
    with pytest.raises(ValueError, match=r"\[0, 9\)"):
        mask_to_tokens(mask + 9, 16, 16, 9)
    with pytest.raises(ValueError, match="stride"):
        mask_to_tokens(mask, 16, 20, 9)


def test_parsing_loss_matches_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 4)
    targets = torch.tensor([[0, 1, -1, 3, 2], [-1, -1, 1, 1, 0]])
    keep = targets >= 0
    for ls in (0.0, 0.1):
        expect = F.cross_entropy(logits[keep], targets[keep], label_smoothing=ls)
        torch.testing.assert_close(parsing_loss(logits, targets, ls), expect)
        torch.testing.assert_close(ParsingLoss(ls)(logits, targets), expect)
    torch.testing.assert_close(parsing_loss(logits, targets), F.cross_entropy(logits[keep], targets[keep],
                                                                               label_smoothing=0.1))


def test_parsing_loss_with_nothing_labelled():
    logits = torch.randn(2, 5, 4, requires_grad=True)
    loss = parsing_loss(logits, torch.full((2, 5), -1))
    assert loss.item() == 0.0 and torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_parsing_loss_under_autocast_and_errors():
    logits = torch.randn(2, 5, 4)
    targets = torch.tensor([[0, 1, -1, 3, 2], [-1, -1, 1, 1, 0]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert parsing_loss(logits.bfloat16(), targets).dtype == torch.float32
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        parsing_loss(logits, targets + 2)
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        parsing_loss(logits, targets[:, :4])
    with pytest.raises(ValueError, match=r"\[B, N, C\]"):
        parsing_loss(logits[0], targets)


def test_fractions_of_a_drawn_mask():
    mask = torch.zeros(2, 32, 32, dtype=torch.long)
    mask[0, :6, 16:] = 2  # top-right window: 96 px arm, 160 px background
    mask[0, 16:, :4] = 7  # bottom-left: a 4-pixel-wide foot strip, 64 px
    mask[1] = NO_MASK
    mask[1, :16, :8] = 3  # a window half unlabelled: fractions over its labelled pixels
    frac = mask_to_token_fractions(mask, 16, 16, 9)
    assert frac.shape == (2, 4, 9) and frac.dtype == torch.float32
    assert frac[0, 1, 2].item() == 96 / 256 and frac[0, 1, 0].item() == 160 / 256
    assert frac[0, 2, 7].item() == 64 / 256
    assert mask_to_tokens(mask, 16, 16, 9)[0].tolist() == [0, 0, 0, 0]  # the vote loses both thin parts
    assert frac[1, 0, 3].item() == 1.0 and frac[1, 1:].abs().sum().item() == 0.0  # no labelled pixel: all 0
    torch.testing.assert_close(frac[0].sum(-1), torch.ones(4))


@pytest.mark.parametrize("stride", [16, 11])
def test_fractions_match_counting_and_the_vote(stride):
    g = torch.Generator().manual_seed(stride)
    mask = torch.randint(-1, 9, (2, 64, 32), generator=g)
    frac = mask_to_token_fractions(mask, 16, stride, 9)
    windows = F.unfold(mask[:, None].float(), 16, stride=stride).long()  # [B, 256, N]
    for b in range(2):
        for n in range(windows.shape[-1]):
            win = windows[b, :, n]
            counts = torch.bincount(win[win >= 0], minlength=9).float()
            torch.testing.assert_close(frac[b, n], counts / counts.sum())
    labels = mask_to_tokens(mask, 16, stride, 9)
    assert torch.equal(frac.argmax(-1), labels)  # ties resolve to the lower label in both


def test_soft_parsing_loss_equals_the_hard_loss_on_one_hot_targets():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 4)
    labels = torch.tensor([[0, 1, -1, 3, 2], [-1, -1, 1, 1, 0]])
    soft = F.one_hot(labels.clamp(min=0), 4).float() * (labels >= 0)[..., None]
    for ls in (0.0, 0.1):
        torch.testing.assert_close(parsing_loss(logits, soft, ls), parsing_loss(logits, labels, ls))


def test_soft_parsing_loss_is_the_expected_cross_entropy():
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 4, requires_grad=True)
    t = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]]])
    expect = -(t[0, [0, 2]] * logits[0, [0, 2]].log_softmax(-1)).sum(-1).mean()
    loss = parsing_loss(logits, t, 0.0)
    torch.testing.assert_close(loss, expect)
    loss.backward()
    assert logits.grad[0, 1].abs().sum().item() == 0.0  # the unlabelled token gets no gradient
    with pytest.raises(ValueError, match=r"soft token_targets must be \[B, N, C\]"):
        parsing_loss(logits, t[..., :3])
    with pytest.raises(ValueError, match="label_smoothing"):
        parsing_loss(logits, t, 1.0)
