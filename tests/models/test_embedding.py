"""The backbone owns its embedding: the model's encoder and the masked view read `ReIDViT.embed`, which embeds all
patches or only the kept ones (through masked_gather), with the seen cameras' mean for unknown cameras; and the
models room does not import the data pipeline."""

from __future__ import annotations

import subprocess
import sys

import torch

from amfor.models.backbone import ReIDViT

TINY = dict(img_size=(64, 32), patch_size=16, stride=12, embed_dim=32, depth=3, num_heads=2, drop_path_rate=0.0)


def test_masked_embedding_is_the_full_embedding_of_the_kept_patches():
    torch.manual_seed(0)
    vit = ReIDViT(num_cameras=3, **TINY).eval()
    x, cams = torch.randn(2, 3, 64, 32), torch.tensor([2, -1])
    index = torch.stack([torch.randperm(vit.num_patches)[:4] for _ in range(2)])
    full, kept = vit.embed(x, cams), vit.embed(x, cams, index)
    assert kept.shape == (2, 1 + 4, 32)
    torch.testing.assert_close(kept[:, 0], full[:, 0])
    torch.testing.assert_close(kept[:, 1:], torch.gather(full[:, 1:], 1, index[..., None].expand(-1, -1, 32)))
    shared = vit.embed(x, cams, index, patches=vit.patch_tokens(x), check_index=False)
    torch.testing.assert_close(shared, kept)


def test_unseen_and_unknown_cameras_get_the_seen_cameras_mean():
    torch.manual_seed(0)
    vit = ReIDViT(num_cameras=3, sie_coef=2.0, **TINY).eval()
    x = torch.randn(1, 3, 64, 32).expand(3, -1, -1, -1)
    seen = torch.tensor([True, True, False])
    out = vit.embed(x, torch.tensor([0, 2, -1]), seen=seen)
    base = vit.embed(x[:1], torch.tensor([0]))[0] - 2.0 * vit.sie_embed[0]
    mean = 2.0 * vit.sie_embed[:2].mean(0)
    torch.testing.assert_close(out[1], base + mean)  # camera 2 was not seen in training
    torch.testing.assert_close(out[2], base + mean)  # an unknown camera
    torch.testing.assert_close(out[0], base + 2.0 * vit.sie_embed[0])


def test_the_model_encoder_is_the_backbone_embedding_through_the_blocks(small, batch):
    model = small.model(amff=False).eval()
    model.set_train_cameras([0, 1])  # camera 2 unseen: the mean embedding
    images, cams = batch["img"], torch.tensor([0, 2, -1, 1])
    index = torch.stack([torch.randperm(model.backbone.num_patches)[:3] for _ in range(4)])
    vit = model.backbone
    for idx in (None, index):
        x = vit.embed(images, cams, idx, seen=model.cameras_seen)
        for blk in vit.blocks:
            x = blk(x)
        torch.testing.assert_close(model.forward_encoder(images, cams, None, idx), x, rtol=0, atol=0)


def test_training_embeds_both_views_through_the_backbone(small, batch, monkeypatch):
    model = small.model(hpr=True).train()
    calls = []
    embed = model.backbone.embed

    def spy(*args, **kwargs):
        calls.append(kwargs.get("index") if len(args) < 3 else args[2])
        return embed(*args, **kwargs)

    monkeypatch.setattr(model.backbone, "embed", spy)
    model(batch["img"], batch["pid"], batch["camid"], batch["mask"], batch["occlusion"])
    assert len(calls) == 2 and calls[0] is None and calls[1].shape[0] == 4  # the full view, then the masked one


def test_the_models_do_not_import_the_data_pipeline():
    code = ("import sys, amfor.models; bad = sorted(m for m in sys.modules if m.startswith('amfor.data')); "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
