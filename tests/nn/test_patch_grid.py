"""One module owns the ViT patch grid: its geometry agrees with the backbone's convolution, every map cut along it
(pixels, part masks, occlusion) has the grid's N tokens, and the old import paths give the same functions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from amfor.nn import patch_grid


@pytest.mark.parametrize("size, patch, stride", [((64, 32), 16, 16), ((64, 32), 16, 12), ((50, 30), 8, 5)])
def test_every_cut_has_the_grid_of_a_strided_convolution(size, patch, stride):
    ny, nx = patch_grid.grid_size(size, patch, stride)
    conv = F.conv2d(torch.zeros(1, 3, *size), torch.zeros(4, 3, patch, patch), stride=stride)
    assert (ny, nx) == tuple(conv.shape[-2:])
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, *size, generator=g)
    masks = torch.randint(-1, 4, (2, *size), generator=g)
    occlusion = torch.rand(2, *size, generator=g) > 0.5
    assert patch_grid.patchify(images, patch, stride).shape == (2, ny * nx, 3 * patch * patch)
    assert patch_grid.mask_to_tokens(masks, patch, stride, 4).shape == (2, ny * nx)
    assert patch_grid.mask_to_token_fractions(masks, patch, stride, 4).shape == (2, ny * nx, 4)
    assert patch_grid.patch_occlusion(occlusion, patch, stride).shape == (2, ny, nx)
    # a patch vector is what the convolution reads: conv with a one-hot kernel picks that pixel of every patch
    kernel = torch.zeros(1, 3, patch, patch)
    kernel[0, 1, 2, 3] = 1
    picked = F.conv2d(images, kernel, stride=stride).flatten(1)
    torch.testing.assert_close(patch_grid.patchify(images, patch, stride)[..., patch * patch + 2 * patch + 3], picked)


def test_the_backbone_grid_is_the_patch_grid():
    from amfor.models.backbone import ReIDViT

    vit = ReIDViT(img_size=(64, 32), patch_size=16, stride=12, embed_dim=16, depth=2, num_heads=2)
    assert vit.grid_size == patch_grid.grid_size((64, 32), 16, 12)


def test_a_grid_that_does_not_fit_names_what_was_cut():
    with pytest.raises(ValueError, match=r"stride 20, patch_size 16, image 64x32"):
        patch_grid.grid_size((64, 32), 16, 20)
    with pytest.raises(ValueError, match=r"patch_size 16, mask 8x8"):
        patch_grid.mask_to_tokens(torch.zeros(1, 8, 8, dtype=torch.long), 16, 16, 3)
    with pytest.raises(ValueError, match=r"mask values must lie in \[0, 3\) or be -1"):
        patch_grid.mask_to_tokens(torch.full((1, 16, 16), 5), 16, 16, 3)


def test_the_old_import_paths_give_the_grid_functions():
    import amfor.data
    import amfor.data.transforms
    import amfor.losses
    import amfor.losses.parsing
    import amfor.losses.reconstruction

    assert amfor.losses.patchify is amfor.losses.reconstruction.patchify is patch_grid.patchify
    assert amfor.losses.mask_to_tokens is amfor.losses.parsing.mask_to_tokens is patch_grid.mask_to_tokens
    assert amfor.losses.mask_to_token_fractions is patch_grid.mask_to_token_fractions
    assert amfor.losses.parsing.token_part_counts is patch_grid.token_part_counts
    assert amfor.data.patch_occlusion is amfor.data.transforms.patch_occlusion is patch_grid.patch_occlusion
