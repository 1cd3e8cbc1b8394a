"""mask_to_tokens on drawn masks (stride 16 and an overlapping stride), parsing_loss, errors."""

import pytest
import torch
import torch.nn.functional as F

from amfor.data import NO_MASK
from amfor.losses import ParsingLoss, mask_to_tokens, parsing_loss
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
