"""PatchDropout: a drop-in for timm's patch dropout built on masked_gather."""

import pytest
import torch

from amfor.nn import PatchDropout, apply_patch_dropout


def test_keeps_prefix_and_a_sorted_subset_of_patches():
    torch.manual_seed(0)
    x = torch.randn(3, 1 + 20, 8, requires_grad=True)
    drop = PatchDropout(0.25, num_prefix_tokens=1, return_indices=True).train()
    out, index = drop(x)
    assert out.shape == (3, 1 + 15, 8) and index.shape == (3, 15)
    assert (index[:, 1:] > index[:, :-1]).all()
    torch.testing.assert_close(out[:, 0], x[:, 0])
    expected = torch.gather(x[:, 1:], 1, index[:, :, None].expand(-1, -1, 8))
    torch.testing.assert_close(out[:, 1:], expected)
    out.sum().backward()
    kept = torch.zeros(3, 21).scatter_(1, torch.cat([torch.zeros(3, 1, dtype=torch.long), index + 1], 1), 1.0)
    torch.testing.assert_close(x.grad, kept[:, :, None].expand(-1, -1, 8))


def test_scores_keep_the_least_occluded_patches():
    x = torch.randn(2, 2 + 6, 4)
    scores = torch.tensor([[0.9, 0.0, 0.8, 0.1, 0.7, 0.2], [0.0, 0.0, 1.0, 1.0, 1.0, 0.5]])
    drop = PatchDropout(0.5, num_prefix_tokens=2, return_indices=True).train()
    _, index = drop(x, scores=scores)
    assert index.tolist() == [[1, 3, 5], [0, 1, 5]]


def test_eval_is_identity_and_bad_prob_is_rejected():
    x = torch.randn(2, 5, 4)
    assert PatchDropout(0.5).eval()(x) is x
    with pytest.raises(ValueError, match="prob"):
        PatchDropout(1.0)


def test_drop_in_for_a_timm_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=(64, 32), num_classes=0)
    apply_patch_dropout(vit, 0.5)
    assert isinstance(vit.patch_drop, PatchDropout)
    img = torch.randn(2, 3, 64, 32)
    vit.train()
    tokens = vit.forward_features(img)
    assert tokens.shape == (2, 1 + 4, vit.embed_dim)  # 4x2 = 8 patches, half kept, plus CLS
    tokens.mean().backward()
    assert vit.patch_embed.proj.weight.grad is not None
    vit.eval()
    assert vit.forward_features(img).shape == (2, 1 + 8, vit.embed_dim)
    with pytest.raises(TypeError, match="patch_drop"):
        apply_patch_dropout(torch.nn.Linear(2, 2), 0.5)
