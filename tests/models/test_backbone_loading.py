"""ReIDViT weight loading: timm ViT-B checkpoints (.pth / .safetensors), TransReID / HAP-style dicts, errors."""

import collections
import json
import logging

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models.vision_transformer import VisionTransformer

from amfor.models.backbone import (
    LoadReport,
    ReIDViT,
    checkpoint_filter_fn,
    filter_checkpoint,
    infer_grid,
    load_state_dict_file,
)


@pytest.fixture(scope="module")
def timm_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).eval()


@pytest.fixture(scope="module")
def vit_files(timm_vit, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    sd = {k: v.contiguous() for k, v in timm_vit.state_dict().items()}
    torch.save(sd, folder / "vit.pth")
    save_file(sd, str(folder / "vit.safetensors"))
    return folder / "vit.pth", folder / "vit.safetensors"


def assert_blocks_equal(ours: ReIDViT, vit) -> None:
    """Shared blocks 0..depth-2 and last_block equal timm's blocks, the final norms equal."""
    theirs = list(vit.blocks)
    for mine, ref in zip([*ours.blocks, ours.last_block], theirs, strict=True):
        ref_sd = ref.state_dict()
        for k, v in mine.state_dict().items():
            assert torch.equal(v, ref_sd[k]), k
    assert torch.equal(ours.norm.weight, vit.norm.weight) and torch.equal(ours.norm.bias, vit.norm.bias)


def test_timm_vit_b_loads_exactly(timm_vit, vit_files, caplog):
    ours = ReIDViT(img_size=(224, 224), stride=16, num_cameras=0, drop_path_rate=0.0).eval()
    with caplog.at_level(logging.INFO, logger="amfor.models.backbone"):
        report = ours.load_pretrained(vit_files[0])
    assert isinstance(report, LoadReport)
    assert report.missing == [] and report.unexpected == [] and report.resampled == []
    assert str(vit_files[0]) in caplog.text
    assert_blocks_equal(ours, timm_vit)
    assert torch.equal(ours.pos_embed, timm_vit.pos_embed) and torch.equal(ours.cls_token, timm_vit.cls_token)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x)[1], timm_vit.forward_features(x), atol=1e-5, rtol=0)


def test_timm_vit_b_into_stride_11_at_256x128(timm_vit, vit_files):
    ours = ReIDViT(img_size=(256, 128), stride=11, drop_path_rate=0.0)
    report = ours.load_pretrained(vit_files[1], strict=True)  # the .safetensors copy
    assert report.resampled == ["pos_embed: 14x14 -> 22x11"] and report.missing == []
    assert ours.patch_embed.proj.stride == (11, 11)
    assert torch.equal(ours.patch_embed.proj.weight, timm_vit.patch_embed.proj.weight)
    assert torch.equal(ours.patch_embed.proj.bias, timm_vit.patch_embed.proj.bias)
    assert_blocks_equal(ours, timm_vit)
    expect = resample_abs_pos_embed(timm_vit.pos_embed, (22, 11), (14, 14), num_prefix_tokens=1)
    assert ours.pos_embed.shape == (1, 243, 768) and torch.equal(ours.pos_embed, expect)


def test_transreid_style_dict(timm_vit, tmp_path):
    torch.manual_seed(2)
    sd = {f"module.base.{k}": v for k, v in timm_vit.state_dict().items()}
    pos = torch.randn(1, 1 + 21 * 10, 768)
    sd["module.base.pos_embed"] = pos
    sd["module.classifier.weight"] = torch.randn(751, 768)
    sd["module.base.sie_embed"] = torch.randn(3, 1, 768)  # 3 cameras, the model has 6
    # TransReID's trained copy of the last block and norm (b1) takes precedence over base.blocks.11 / base.norm
    b1 = {f"module.b1.0.{k}": v + 1.0 for k, v in timm_vit.blocks[11].state_dict().items()}
    b1.update({f"module.b1.1.{k}": v - 1.0 for k, v in timm_vit.norm.state_dict().items()})
    sd.update(b1)
    torch.save(sd, tmp_path / "transreid.pth")

    ours = ReIDViT(img_size=(256, 128), stride=16, num_cameras=6)
    report = ours.load_pretrained(tmp_path / "transreid.pth")
    assert "classifier.weight" in report.unexpected
    assert "blocks.11.attn.qkv.weight" in report.unexpected and "norm.weight" in report.unexpected
    assert report.resampled == ["pos_embed: 21x10 -> 16x8"]
    assert report.missing == ["sie_embed"] and report.dropped and "3 cameras" in report.dropped[0]
    assert "classifier" in str(report)
    torch.testing.assert_close(ours.pos_embed, resample_abs_pos_embed(pos, (16, 8), (21, 10), num_prefix_tokens=1),
                               atol=0, rtol=0)
    for i in range(11):
        torch.testing.assert_close(ours.blocks[i].mlp.fc1.weight, timm_vit.blocks[i].mlp.fc1.weight, atol=0, rtol=0)
    torch.testing.assert_close(ours.last_block.attn.qkv.weight, timm_vit.blocks[11].attn.qkv.weight + 1.0)
    torch.testing.assert_close(ours.norm.weight, timm_vit.norm.weight - 1.0)


# ---- the rest on a tiny ViT (embed 32, depth 3): wrappers, resampling rules, errors ----

TINY = dict(embed_dim=32, depth=3, num_heads=2, drop_path_rate=0.0)


@pytest.fixture(scope="module")
def tiny_sd():
    torch.manual_seed(3)
    vit = VisionTransformer(img_size=64, patch_size=16, embed_dim=32, depth=3, num_heads=2, num_classes=0)
    return vit.state_dict()


@pytest.mark.parametrize("wrap", ["model", "state_dict", "module"])
def test_wrapped_dicts(tiny_sd, tmp_path, wrap):
    path = tmp_path / f"{wrap}.pth"
    torch.save({wrap: tiny_sd, "epoch": 3}, path)
    loaded = load_state_dict_file(path)
    assert loaded.keys() == tiny_sd.keys()
    ours = ReIDViT(img_size=(64, 64), **TINY)
    report = ours.load_pretrained(path, strict=True)
    assert report.missing == [] and report.unexpected == []
    assert torch.equal(ours.last_block.mlp.fc2.weight, tiny_sd["blocks.2.mlp.fc2.weight"])
    assert torch.equal(ours.blocks[1].norm1.weight, tiny_sd["blocks.1.norm1.weight"])


def test_hap_style_dict_with_decoder(tiny_sd):
    """An MAE / HAP checkpoint: a 16x8 grid at 256x128 (not square), plus decoder and mask-token keys."""
    sd = dict(tiny_sd)
    sd["pos_embed"] = torch.randn(1, 1 + 128, 32)
    sd["mask_token"] = torch.zeros(1, 1, 32)
    sd["decoder_embed.weight"] = torch.zeros(16, 32)
    sd["head.weight"] = torch.zeros(10, 32)
    ours = ReIDViT(img_size=(256, 128), stride=11, **TINY)
    out, report = filter_checkpoint({"backbone." + k: v for k, v in sd.items()}, ours)
    assert {"mask_token", "decoder_embed.weight", "head.weight"} <= set(report.unexpected)
    assert not {"mask_token", "decoder_embed.weight", "head.weight"} & out.keys()
    assert report.resampled == ["pos_embed: 16x8 -> 22x11"]
    assert torch.equal(out["pos_embed"], resample_abs_pos_embed(sd["pos_embed"], (22, 11), (16, 8)))
    assert checkpoint_filter_fn(sd, ours).keys() == out.keys()
    # an explicit old grid wins over the inference (here a wrong-but-allowed 32x4)
    forced = checkpoint_filter_fn(sd, ours, old_grid=(32, 4))
    assert torch.equal(forced["pos_embed"], resample_abs_pos_embed(sd["pos_embed"], (22, 11), (32, 4)))
    with pytest.raises(ValueError, match="old_grid"):
        checkpoint_filter_fn(sd, ours, old_grid=(10, 10))


def test_infer_grid():
    assert infer_grid(196, (22, 11)) == (14, 14)
    assert infer_grid(128, (22, 11)) == (16, 8)
    assert infer_grid(210, (22, 11)) == (21, 10)
    assert infer_grid(242, (16, 8)) == (22, 11)
    assert infer_grid(128, (8, 16)) == (8, 16)


def test_patch_kernel_resampled(tiny_sd):
    sd = dict(tiny_sd)
    sd["patch_embed.proj.weight"] = torch.randn(32, 3, 8, 8)
    ours = ReIDViT(img_size=(64, 64), **TINY)
    out, report = filter_checkpoint(sd, ours)
    assert "patch_embed.proj.weight: 8x8 -> 16x16" in report.resampled
    assert torch.equal(out["patch_embed.proj.weight"], resample_patch_embed(sd["patch_embed.proj.weight"], [16, 16]))


def test_strict_shape_and_format_errors(tiny_sd, tmp_path):
    ours = ReIDViT(img_size=(64, 64), **TINY)
    partial = {k: v for k, v in tiny_sd.items() if not k.startswith("blocks.1.")}
    torch.save(partial, tmp_path / "partial.pth")
    assert "blocks.1.attn.qkv.weight" in ours.load_pretrained(tmp_path / "partial.pth").missing
    with pytest.raises(ValueError, match="partial.pth.*missing"):
        ours.load_pretrained(tmp_path / "partial.pth", strict=True)
    wide = ReIDViT(img_size=(64, 64), embed_dim=48, depth=3, num_heads=2)
    with pytest.raises(ValueError, match="shape"):
        checkpoint_filter_fn(tiny_sd, wide)
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="resnet.pth.*no backbone weight"):
        ours.load_pretrained(tmp_path / "resnet.pth")
    torch.save({"visual.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(96, 32)}, tmp_path / "clip.pth")
    with pytest.raises(ValueError, match="clip.pth.*CLIP"):
        ours.load_pretrained(tmp_path / "clip.pth")


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_state_dict_file(tmp_path / "nothere.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                      dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(ValueError, match="garbage.pth"):
        load_state_dict_file(garbage)
    bad_st = tmp_path / "garbage.safetensors"
    bad_st.write_bytes(garbage.read_bytes())
    with pytest.raises(ValueError, match="garbage.safetensors"):
        load_state_dict_file(bad_st)
    js = tmp_path / "config.json"
    js.write_text(json.dumps({"model": {"depth": 12}}))
    with pytest.raises(ValueError, match="config.json"):
        load_state_dict_file(js)
    empty = tmp_path / "empty.pth"
    torch.save({"model": {"epoch": 3}}, empty)
    with pytest.raises(ValueError, match="empty.pth.*no state dict"):
        load_state_dict_file(empty)
    pickled = tmp_path / "objects.pth"
    torch.save({"opt": collections.Counter(a=1)}, pickled)  # not allowed by weights_only
    with pytest.raises(ValueError, match="objects.pth"):
        load_state_dict_file(pickled)
