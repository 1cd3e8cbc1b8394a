"""QueryFusionPool: a drop-in for timm's AttentionPoolLatent (same output), and pooling over several blocks."""

from __future__ import annotations

import pytest
import torch

from amfor.nn import QueryFusionPool, apply_query_fusion_pool, query_fusion_features

timm = pytest.importorskip("timm")  # every test here builds a timm ViT or module (amfor.nn imports without it)


@pytest.fixture
def vit():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=(64, 32), num_classes=0,
                              global_pool="map").eval()
    with torch.no_grad():  # non-trivial biases, which the conversion must carry over
        for name, p in model.attn_pool.named_parameters():
            if name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def test_drop_in_for_timm_attention_pool(vit):
    images = torch.randn(4, 3, 64, 32)
    expected = vit(images)
    apply_query_fusion_pool(vit)
    assert isinstance(vit.attn_pool, QueryFusionPool)
    torch.testing.assert_close(vit(images), expected, rtol=1e-5, atol=1e-5)


def test_pooling_over_several_blocks_starts_from_the_same_weights(vit):
    images = torch.randn(2, 3, 64, 32)
    apply_query_fusion_pool(vit, layers=(-1,))
    torch.testing.assert_close(query_fusion_features(vit, images), vit(images), rtol=1e-5, atol=1e-5)
    apply_query_fusion_pool(vit, layers=(-3, -2, -1))
    feats = query_fusion_features(vit, images)
    assert feats.shape == (2, 192)
    feats.sum().backward()
    assert vit.query_fusion_pool.pool.attn.layer_logits.grad is not None


def test_conversion_errors():
    with pytest.raises(TypeError, match="global_pool='map'"):
        apply_query_fusion_pool(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0))
    with pytest.raises(ValueError, match="pool_type"):
        QueryFusionPool(32, 4, pool_type="max")
