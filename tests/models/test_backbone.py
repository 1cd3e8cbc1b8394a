"""ReIDViT: token counts for overlapping strides, determinism, camera embedding (SIE), input checks."""

import pytest
import torch

from amfor.models.backbone import ReIDViT

TINY = dict(embed_dim=32, depth=3, num_heads=2)


@pytest.mark.parametrize("stride, grid", [(16, (16, 8)), (12, (21, 10)), (11, (22, 11))])
def test_token_counts_at_256x128(stride, grid):
    torch.manual_seed(0)
    model = ReIDViT(img_size=(256, 128), stride=stride, **TINY)
    assert model.grid_size == grid and model.num_patches == grid[0] * grid[1]
    assert model.patch_embed.proj.stride == (stride, stride) and model.patch_embed.grid_size == grid
    assert model.pos_embed.shape == (1, 1 + model.num_patches, 32)
    x = torch.randn(2, 3, 256, 128)
    assert model.patch_tokens(x).shape == (2, model.num_patches, 32)
    xs = model.forward_intermediates(x)
    assert len(xs) == 3 and all(t.shape == (2, 1 + model.num_patches, 32) for t in xs)
    m, g = model.forward_features(x)
    assert m.shape == g.shape == (2, 1 + model.num_patches, 32)


def test_tiny_config_and_layout():
    torch.manual_seed(0)
    model = ReIDViT(img_size=(128, 64), patch_size=16, stride=12, drop_path_rate=0.3, **TINY).eval()
    assert model.grid_size == (10, 5) and len(model.blocks) == 2
    rates = [b.drop_path1.drop_prob if hasattr(b.drop_path1, "drop_prob") else 0.0
             for b in [*model.blocks, model.last_block]]
    assert rates == pytest.approx([0.0, 0.15, 0.3])
    assert model.norm.eps == 1e-6 and model.num_prefix_tokens == 1
    assert model.no_weight_decay() == {"cls_token", "pos_embed"}
    x = torch.randn(2, 3, 128, 64)
    xs = model.forward_intermediates(x)
    m, g = model.forward_features(x)
    # x_0 is embed; M is the last intermediate; G is norm(last_block(M))
    torch.testing.assert_close(xs[0], model.embed(x))
    torch.testing.assert_close(xs[-1], m)
    torch.testing.assert_close(g, model.norm(model.last_block(m)))
    torch.testing.assert_close(model(x), g[:, 0])
    # embed = cat(cls, patches) + pos
    expect = torch.cat([model.cls_token.expand(2, -1, -1), model.patch_tokens(x)], 1) + model.pos_embed
    torch.testing.assert_close(xs[0], expect)


def test_eval_is_deterministic_and_train_drop_path_is_not():
    torch.manual_seed(0)
    model = ReIDViT(img_size=(128, 64), drop_path_rate=0.5, **TINY)
    x = torch.randn(4, 3, 128, 64)
    model.eval()
    with torch.no_grad():
        a, b = model.forward_features(x)[1], model.forward_features(x)[1]
    assert torch.equal(a, b)
    model.train()
    with torch.no_grad():
        outs = [model.forward_features(x)[1] for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    torch.manual_seed(1)
    off = ReIDViT(img_size=(128, 64), drop_path_rate=0.0, **TINY).train()
    with torch.no_grad():
        assert torch.equal(off.forward_features(x)[1], off.forward_features(x)[1])


def test_camera_embedding():
    torch.manual_seed(0)
    model = ReIDViT(img_size=(128, 64), num_cameras=4, sie_coef=3.0, drop_path_rate=0.0, **TINY).eval()
    assert model.sie_embed.shape == (4, 1, 32)
    assert model.no_weight_decay() == {"cls_token", "pos_embed", "sie_embed"}
    x = torch.randn(1, 3, 128, 64).expand(2, -1, -1, -1)
    cams = torch.tensor([0, 3])
    sie = model.camera_embedding(cams, 2)
    torch.testing.assert_close(sie, 3.0 * model.sie_embed[cams])
    emb = model.embed(x, cams)
    no_sie = torch.cat([model.cls_token.expand(2, -1, -1), model.patch_tokens(x)], 1) + model.pos_embed
    torch.testing.assert_close(emb, no_sie + sie)  # added to all 1 + N tokens
    g = model.forward_features(x, cams)[1]
    assert not torch.allclose(g[0], g[1])  # same image, different camera
    g_same = model.forward_features(x, torch.tensor([3, 3]))[1]
    torch.testing.assert_close(g_same[0], g_same[1])


def test_camera_id_errors():
    model = ReIDViT(img_size=(128, 64), num_cameras=4, **TINY)
    x = torch.randn(2, 3, 128, 64)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        model.forward_features(x, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        model.forward_features(x, torch.tensor([-2, 0]))  # -1 is an unknown camera, not an error
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        model.forward_features(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        model.forward_features(x, torch.tensor([0.0, 1.0]))
    plain = ReIDViT(img_size=(128, 64), **TINY).eval()
    assert plain.sie_embed is None and plain.camera_embedding(torch.tensor([9, 9]), 2) is None
    torch.testing.assert_close(plain.forward_features(x, torch.tensor([7, 99]))[1], plain.forward_features(x)[1])
    off = ReIDViT(img_size=(128, 64), num_cameras=4, sie_coef=0.0, **TINY).eval()  # SIE switched off
    assert off.sie_embed is None and "sie_embed" not in off.no_weight_decay()
    torch.testing.assert_close(off.forward_features(x, torch.tensor([0, 3]))[1], off.forward_features(x)[1])
    with pytest.raises(ValueError, match="sie_coef"):
        ReIDViT(img_size=(128, 64), num_cameras=4, sie_coef=-1.0, **TINY)


def test_an_unknown_camera_gets_the_mean_embedding_of_the_seen_cameras():
    """camids None (all) or -1 (one image): the mean SIE vector, over every camera or the `seen` ones."""
    torch.manual_seed(0)
    model = ReIDViT(img_size=(128, 64), num_cameras=3, sie_coef=2.0, **TINY).eval()
    table = model.sie_embed
    torch.testing.assert_close(model.camera_embedding(None, 2), 2.0 * table.mean(0).expand(2, 1, -1))
    sie = model.camera_embedding(torch.tensor([1, -1]), 2)
    torch.testing.assert_close(sie[0], 2.0 * table[1])
    torch.testing.assert_close(sie[1], 2.0 * table.mean(0))
    seen = torch.tensor([True, False, True])
    sie = model.camera_embedding(torch.tensor([0, 1, -1]), 3, seen)
    torch.testing.assert_close(sie[0], 2.0 * table[0])
    torch.testing.assert_close(sie[1:], 2.0 * ((table[0] + table[2]) / 2).expand(2, 1, -1))  # unseen = unknown
    x = torch.randn(2, 3, 128, 64)
    torch.testing.assert_close(model(x), model(x, torch.tensor([-1, -1])))


@pytest.mark.parametrize("shape", [(2, 3, 256, 128), (2, 1, 128, 64), (3, 128, 64), (2, 3, 128, 65)])
def test_bad_image_size(shape):
    model = ReIDViT(img_size=(128, 64), **TINY)
    with pytest.raises(ValueError, match=r"\[B, 3, 128, 64\]"):
        model.forward_features(torch.randn(*shape))


def test_bad_config():
    with pytest.raises(ValueError, match="stride"):
        ReIDViT(img_size=(128, 64), stride=20, **TINY)
    with pytest.raises(ValueError, match="depth"):
        ReIDViT(img_size=(128, 64), embed_dim=32, depth=1, num_heads=2)
