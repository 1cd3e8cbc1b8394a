"""MAE-style masked training of a timm ViT on the fused ops equals timm's own sequence; the decoder's grid."""

from __future__ import annotations

import pytest
import torch

from amfor.nn import MAEDecoder, masked_forward_features
from amfor.ops import random_masking

timm = pytest.importorskip("timm")  # every test here builds a timm ViT or module (amfor.nn imports without it)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=(64, 32), num_classes=0).eval()


def reference_masked_features(vit, images, index):
    """timm's own steps: all tokens embedded, the kept ones (prefix first) gathered, blocks, norm."""
    x = vit._pos_embed(vit.patch_embed(images))
    P = vit.num_prefix_tokens
    keep = torch.cat([torch.arange(P).expand(index.shape[0], P), index + P], dim=1)
    x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))
    return vit.norm(vit.blocks(vit.norm_pre(x)))


def test_masked_forward_features_equals_timm(vit):
    images = torch.randn(3, 3, 64, 32)
    N = vit.patch_embed.num_patches
    index, _ = random_masking(3, N, 2)
    ours = masked_forward_features(vit, images, index)
    torch.testing.assert_close(ours, reference_masked_features(vit, images, index))
    full = masked_forward_features(vit, images, torch.arange(N).expand(3, N))
    torch.testing.assert_close(full, vit.forward_features(images))


def test_gradients_reach_the_embedding_of_kept_patches_only(vit):
    images = torch.randn(2, 3, 64, 32, requires_grad=True)
    index = torch.tensor([[0, 5], [1, 7]])
    masked_forward_features(vit, images, index).sum().backward()
    grad = images.grad.abs().sum(1)  # [2, 64, 32]: pixel (r, c) belongs to patch (r // 16) * 2 + c // 16
    kept = torch.zeros(64, 32, dtype=torch.bool)
    kept[:16, :16] = kept[32:48, 16:] = True  # patches 0 and 5 of image 0
    assert bool((grad[0][kept] > 0).all()) and grad[0][~kept].sum() == 0


def test_decoder_puts_the_mask_token_where_nothing_was_kept():
    torch.manual_seed(0)
    dec = MAEDecoder(embed_dim=24, num_patches=8, out_dim=12, decoder_dim=16, depth=0, num_heads=2)
    latent = torch.randn(2, 1 + 3, 24)
    index = torch.tensor([[0, 2, 5], [1, 3, 7]])
    out = dec(latent, index)
    assert out.shape == (2, 8, 12)
    # with no block, a withheld patch sees only the mask token and its position: the same in both images
    withheld = [4, 6]
    torch.testing.assert_close(out[0, withheld], out[1, withheld])
    assert not torch.allclose(out[0, 0], out[1, 0])


def test_masked_forward_features_of_a_reid_vit_uses_its_own_embedding():
    """amfor's ReIDViT owns its embedding (camera embedding, last block): the masked features are its global
    branch on the kept tokens, and with every patch kept its `forward_features` global branch."""
    from amfor.models.backbone import ReIDViT

    torch.manual_seed(0)
    vit = ReIDViT(img_size=(64, 32), patch_size=16, stride=12, embed_dim=32, depth=3, num_heads=2,
                  num_cameras=2, drop_path_rate=0.0).eval()
    images, N = torch.randn(2, 3, 64, 32), vit.num_patches
    full = masked_forward_features(vit, images, torch.arange(N).expand(2, N))
    torch.testing.assert_close(full, vit.forward_features(images)[1])
    index, _ = random_masking(2, N, 3)
    x = vit.embed(images, index=index)
    for blk in vit.blocks:
        x = blk(x)
    torch.testing.assert_close(masked_forward_features(vit, images, index), vit.norm(vit.last_block(x)))
