"""ReIDViT weight loading, each format on a file built here in that format: timm (.pth / .bin / .safetensors),
TransReID, CLIP-ReID and OpenAI CLIP (TorchScript), DINO (TransReID-SSL, PersonViT), PASS, MAE (HAP), MoCo v3,
MSN; the resampling rules; one clear error naming the file for anything else."""

import argparse
import collections
import json
import logging

import pytest
import timm
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, convert_weights_to_lp
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from amfor.models.backbone import ReIDViT
from amfor.models.weights import (
    LoadReport,
    checkpoint_filter_fn,
    filter_checkpoint,
    infer_grid,
    load_state_dict_file,
)
from tests.models.checkpoint_files import save_torchscript


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    torch.save(tiny_sd, tmp_path / "tiny.pth")
    wide = ReIDViT(img_size=(64, 64), embed_dim=48, depth=3, num_heads=2)
    with pytest.raises(ValueError, match="tiny.pth: the checkpoint is a ViT of width 32, the backbone's width is 48"):
        wide.load_pretrained(tmp_path / "tiny.pth")
    deep = ReIDViT(img_size=(64, 64), embed_dim=32, depth=4, num_heads=2)
    with pytest.raises(ValueError, match="tiny.pth: the checkpoint has 3 blocks, the backbone 4"):
        deep.load_pretrained(tmp_path / "tiny.pth")
    odd = dict(tiny_sd, **{"blocks.0.mlp.fc1.weight": torch.zeros(64, 32)})  # mlp_ratio 2 instead of 4
    with pytest.raises(ValueError, match="shape"):
        checkpoint_filter_fn(odd, ours)
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="resnet.pth.*no backbone weight"):
        ours.load_pretrained(tmp_path / "resnet.pth")


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


# ---- one test per checkpoint format, each on a tiny file in that format (width 32, 3 blocks, 4x2 grid) ----

SMALL = dict(img_size=(64, 32), patch_size=16, stride=16, embed_dim=32, depth=3, num_heads=2, drop_path_rate=0.0)
WIDE = dict(SMALL, img_size=(96, 48))  # a 6x3 grid: the checkpoint's 4x2 position embedding is resampled


def scrambled(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random (a fresh init has LayerNorms at 1 / 0, which any loader would 'match')."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module.eval()


def tiny_timm_vit(seed: int = 0, **kwargs) -> VisionTransformer:
    return scrambled(VisionTransformer(img_size=(64, 32), patch_size=16, embed_dim=32, depth=3, num_heads=2,
                                       **kwargs), seed)


def tiny_clip(quick_gelu: bool, seed: int = 0) -> CLIP:
    """open_clip's CLIP (OpenAI's layout): a 3-block visual tower of width 32 at 64x32, a 1-layer text tower."""
    vision = CLIPVisionCfg(layers=3, width=32, head_width=16, patch_size=16, image_size=(64, 32))
    return scrambled(CLIP(16, vision_cfg=vision, text_cfg=CLIPTextCfg(width=32, heads=2, layers=1),
                          quick_gelu=quick_gelu), seed)




def bn_state(prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in nn.BatchNorm1d(32).state_dict().items()}


@pytest.mark.parametrize("name", ["vit.pth", "pytorch_model.bin", "model.safetensors"])
def test_timm_files_compute_as_timm(tmp_path, name):
    """timm's files (a plain state dict: torch.save'd .pth / Hugging Face .bin, or .safetensors): same features."""
    vit = tiny_timm_vit(num_classes=5)
    state = {k: v.contiguous() for k, v in vit.state_dict().items()}
    path = tmp_path / name
    save_file(state, str(path)) if name.endswith(".safetensors") else torch.save(state, path)
    ours = ReIDViT(**SMALL).eval()
    report = ours.load_pretrained(path, strict=True)
    assert report.missing == [] and report.unexpected == ["head.bias", "head.weight"] and report.layout == "vit"
    x = torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x)[1], vit.forward_features(x), atol=1e-5, rtol=0)


def test_transreid_checkpoint(tmp_path):
    """TransReID's saved model (build_transformer_local): `base.*` (its ViT with `fc` and the cameras' SIE), the
    global branch `b1` (copy of the last block + norm, trained further), the JPM branch `b2`, classifiers, BNNecks."""
    base = tiny_timm_vit(num_classes=7).state_dict()
    state = {f"base.{k.replace('head.', 'fc.')}": v for k, v in base.items()}
    state["base.sie_embed"] = torch.randn(4, 1, 32)
    state.update({f"b1.0.{k[len('blocks.2.'):]}": v + 1.0 for k, v in base.items() if k.startswith("blocks.2.")})
    state.update({f"b1.1.{k[len('norm.'):]}": v - 1.0 for k, v in base.items() if k.startswith("norm.")})
    state.update({f"b2.0.{k[len('blocks.2.'):]}": v + 2.0 for k, v in base.items() if k.startswith("blocks.2.")})
    state.update({"classifier.weight": torch.randn(5, 32), "classifier_1.weight": torch.randn(5, 32),
                  **bn_state("bottleneck"), **bn_state("bottleneck_1")})
    torch.save(state, tmp_path / "transformer_120.pth")
    ours = ReIDViT(**SMALL, num_cameras=4)
    report = ours.load_pretrained(tmp_path / "transformer_120.pth", strict=True)
    assert report.missing == [] and report.resampled == [] and report.dropped == []
    assert torch.equal(ours.sie_embed, state["base.sie_embed"])
    assert torch.equal(ours.last_block.attn.qkv.weight, state["b1.0.attn.qkv.weight"])
    assert torch.equal(ours.norm.bias, state["b1.1.bias"])
    assert torch.equal(ours.blocks[1].mlp.fc2.weight, base["blocks.1.mlp.fc2.weight"])
    assert torch.equal(ours.pos_embed, base["pos_embed"]) and torch.equal(ours.cls_token, base["cls_token"])
    assert {"b2.0.attn.qkv.weight", "classifier_1.weight", "bottleneck.running_mean", "fc.weight",
            "blocks.2.attn.qkv.weight", "norm.weight"} <= set(report.unexpected)


def clip_reid_state(clip: CLIP) -> dict[str, torch.Tensor]:
    """CLIP-ReID's saved model (make_model_clipreid.build_transformer): image_encoder = CLIP's visual tower,
    text_encoder (transformer, positional_embedding, ln_final, text_projection), prompt_learner, cv_embed
    (cameras x width), classifier / classifier_proj, bottleneck / bottleneck_proj."""
    state = {f"image_encoder.{k}": v for k, v in clip.visual.state_dict().items()}
    text = ("transformer.", "positional_embedding", "ln_final.", "text_projection")
    state.update({f"text_encoder.{k}": v for k, v in clip.state_dict().items() if k.startswith(text)})
    state.update({"prompt_learner.cls_ctx": torch.randn(5, 4, 32), "prompt_learner.token_prefix": torch.randn(1, 5, 32),
                  "prompt_learner.token_suffix": torch.randn(1, 68, 32), "cv_embed": torch.randn(4, 32),
                  "classifier.weight": torch.randn(5, 32), "classifier_proj.weight": torch.randn(5, 16),
                  **bn_state("bottleneck"), **{f"bottleneck_proj.{k}": v for k, v in
                                               nn.BatchNorm1d(16).state_dict().items()}})
    return state


def test_clip_reid_checkpoint(tmp_path):
    clip = tiny_clip(quick_gelu=False)
    state = clip_reid_state(clip)
    torch.save(state, tmp_path / "ViT-B-16_60.pth")
    ours = ReIDViT(**SMALL).eval()
    report = ours.load_pretrained(tmp_path / "ViT-B-16_60.pth", strict=True)
    assert report.layout == "clip" and report.missing == [] and report.resampled == []
    visual = clip.visual
    assert torch.equal(ours.patch_embed.proj.weight, visual.conv1.weight)
    assert torch.equal(ours.patch_embed.proj.bias, torch.zeros(32))
    assert torch.equal(ours.cls_token.flatten(), visual.class_embedding)
    assert torch.equal(ours.pos_embed[0], visual.positional_embedding)
    res = visual.transformer.resblocks
    assert torch.equal(ours.blocks[0].attn.qkv.weight, res[0].attn.in_proj_weight)
    assert torch.equal(ours.blocks[1].attn.proj.bias, res[1].attn.out_proj.bias)
    assert torch.equal(ours.blocks[1].mlp.fc1.weight, res[1].mlp.c_fc.weight)
    assert torch.equal(ours.last_block.norm2.weight, res[2].ln_2.weight)
    assert torch.equal(ours.norm.weight, visual.ln_post.weight)
    assert {d.split(" ")[0] for d in report.dropped} == {"cv_embed", "image_encoder.ln_pre.bias",
                                                         "image_encoder.ln_pre.weight"}
    assert {"image_encoder.proj", "classifier.weight", "prompt_learner.cls_ctx",
            "text_encoder.transformer.resblocks.0.attn.in_proj_weight"} <= set(report.unexpected)
    assert any("QuickGELU" in note for note in report.notes) and "layout clip" in str(report)
    # the mapping is exact: our embedding, CLIP's ln_pre, then our blocks and norm give the CLIP tower's CLS feature
    with torch.no_grad():
        visual.proj = None
        x = torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(1))
        tokens = visual.ln_pre(ours.embed(x))
        for blk in ours.blocks:
            tokens = blk(tokens)
        torch.testing.assert_close(ours.norm(ours.last_block(tokens))[:, 0], visual(x), atol=1e-4, rtol=1e-4)


def test_openai_clip_torchscript_archive(tmp_path):
    """OpenAI's ViT-B-16.pt is a TorchScript archive (fp16 weights, integer input_resolution / context_length /
    vocab_size entries); its visual tower loads as CLIP-ReID starts from it."""
    clip = tiny_clip(quick_gelu=True)
    convert_weights_to_lp(clip)  # OpenAI's files hold conv / linear / attention weights in float16
    state = dict(clip.state_dict(), input_resolution=torch.tensor(224), context_length=torch.tensor(77),
                 vocab_size=torch.tensor(49408))
    save_torchscript(state, tmp_path / "ViT-B-16.pt")
    ours = ReIDViT(**WIDE)
    report = ours.load_pretrained(tmp_path / "ViT-B-16.pt", strict=True)
    assert report.layout == "clip" and report.wrappers == [] and report.resampled == ["pos_embed: 4x2 -> 6x3"]
    assert torch.equal(ours.blocks[0].attn.qkv.weight, clip.visual.transformer.resblocks[0].attn.in_proj_weight.float())
    assert torch.equal(ours.patch_embed.proj.weight, clip.visual.conv1.weight.float())
    pos = resample_abs_pos_embed(clip.visual.positional_embedding[None].float(), (6, 3), (4, 2), num_prefix_tokens=1)
    assert torch.equal(ours.pos_embed, pos)
    assert {"visual.proj", "token_embedding.weight", "logit_scale"} <= set(report.unexpected)


def dino_checkpoint(backbone: dict[str, torch.Tensor]) -> dict:
    """DINO's checkpoint (main_dino.py; TransReID-SSL, PASS and PersonViT pre-train with it): the teacher's
    backbone.* and head.*, the student under DDP (module.*), optimizer, epoch, args (a Namespace), dino_loss."""
    teacher = {f"backbone.{k}": v for k, v in backbone.items()}
    teacher.update({"head.mlp.0.weight": torch.randn(16, 32), "head.last_layer.weight_g": torch.ones(8, 1),
                    "head.last_layer.weight_v": torch.randn(8, 16)})
    return {"student": {f"module.{k}": v + 1.0 for k, v in teacher.items()}, "teacher": teacher,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]}, "epoch": 100,
            "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=8), "dino_loss": {"center": torch.zeros(
                1, 8)}}


def test_dino_teacher_checkpoint(tmp_path):
    """TransReID-SSL / PersonViT (LUPerson, DINO): the teacher's backbone is loaded, its 16x8-style grid resampled."""
    backbone = tiny_timm_vit(num_classes=0).state_dict()
    torch.save(dino_checkpoint(backbone), tmp_path / "vit_small_cfs_lup.pth")
    ours = ReIDViT(**WIDE)
    report = ours.load_pretrained(tmp_path / "vit_small_cfs_lup.pth", strict=True)
    assert report.wrappers == ["teacher"] and report.resampled == ["pos_embed: 4x2 -> 6x3"]
    assert report.unexpected == ["head.last_layer.weight_g", "head.last_layer.weight_v", "head.mlp.0.weight"]
    assert torch.equal(ours.blocks[0].attn.qkv.weight, backbone["blocks.0.attn.qkv.weight"])  # teacher, not student
    assert torch.equal(ours.last_block.mlp.fc2.bias, backbone["blocks.2.mlp.fc2.bias"])
    pos = resample_abs_pos_embed(backbone["pos_embed"], (6, 3), (4, 2), num_prefix_tokens=1)
    assert torch.equal(ours.pos_embed, pos)


def test_pass_checkpoint(tmp_path):
    """PASS (DINO with three part tokens): `pos_embed` holds the patch positions only, `cls_pos` the CLS one."""
    backbone = tiny_timm_vit(num_classes=0).state_dict()
    pos = backbone.pop("pos_embed")
    backbone.update({"cls_pos": pos[:, :1], "pos_embed": pos[:, 1:].clone(),
                     **{f"part_token{i}": torch.randn(1, 1, 32) for i in (1, 2, 3)},
                     **{f"part{i}_pos": torch.randn(1, 1, 32) for i in (1, 2, 3)}})
    torch.save(dino_checkpoint(backbone), tmp_path / "pass_vit_base_full.pth")
    ours = ReIDViT(**SMALL)
    report = ours.load_pretrained(tmp_path / "pass_vit_base_full.pth", strict=True)
    assert report.layout == "pass" and report.resampled == []
    assert torch.equal(ours.pos_embed, pos) and torch.equal(ours.cls_token, backbone["cls_token"])
    assert {"part_token1", "part3_pos"} <= set(report.unexpected) and "cls_pos" not in report.unexpected


def test_ics_stem_is_a_clear_error(tmp_path):
    """TransReID-SSL / PASS 'ICS' models embed patches through a conv stem (patch_embed.conv.*): not ReIDViT's."""
    backbone = tiny_timm_vit(num_classes=0).state_dict()
    backbone["patch_embed.proj.weight"] = torch.randn(32, 64, 8, 8)
    backbone.update({"patch_embed.conv.0.weight": torch.randn(64, 3, 7, 7), "patch_embed.conv.1.IN.weight":
                     torch.ones(32), "patch_embed.conv.1.BN.running_mean": torch.zeros(32)})
    torch.save(dino_checkpoint(backbone), tmp_path / "vit_base_ics_cfs_lup.pth")
    with pytest.raises(ValueError, match="vit_base_ics_cfs_lup.pth: .*convolutional stem"):
        ReIDViT(**SMALL).load_pretrained(tmp_path / "vit_base_ics_cfs_lup.pth")


def test_hap_mae_checkpoint(tmp_path):
    """HAP (MAE on LUPerson): {'epoch', 'arch', 'model': encoder + decoder_* + mask_token, 'optimizer', 'scaler'}."""
    encoder = tiny_timm_vit(num_classes=0).state_dict()
    model = dict(encoder, mask_token=torch.zeros(1, 1, 16), decoder_pos_embed=torch.randn(1, 9, 16),
                 **{"decoder_embed.weight": torch.randn(16, 32), "decoder_pred.weight": torch.randn(768, 16)})
    torch.save({"epoch": 399, "arch": "mae_vit_base_patch16", "model": model,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1.5e-4, "params": [0]}]},
                "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0}}, tmp_path / "ckpt_hap.pth")
    ours = ReIDViT(**WIDE)
    report = ours.load_pretrained(tmp_path / "ckpt_hap.pth", strict=True)
    assert report.wrappers == ["model"] and report.resampled == ["pos_embed: 4x2 -> 6x3"]
    assert {"mask_token", "decoder_embed.weight", "decoder_pos_embed"} <= set(report.unexpected)
    assert torch.equal(ours.blocks[1].norm1.weight, encoder["blocks.1.norm1.weight"])


def test_mocov3_checkpoint(tmp_path):
    """MoCo v3: {'state_dict': module.base_encoder.* (ViT + projector head), module.momentum_encoder.*,
    module.predictor.*}: the base encoder is the backbone (as MoCo v3's own conversion keeps it)."""
    base = tiny_timm_vit(num_classes=0).state_dict()
    state = {f"module.base_encoder.{k}": v for k, v in base.items()}
    state.update({f"module.momentum_encoder.{k}": v - 1.0 for k, v in base.items()})
    state.update({"module.base_encoder.head.0.weight": torch.randn(64, 32), "module.predictor.0.weight":
                  torch.randn(64, 16)})
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": state, "optimizer": {"state": {}, "param_groups": []},
                "scaler": {"scale": 1024.0}}, tmp_path / "mocov3.pth.tar")
    ours = ReIDViT(**SMALL)
    report = ours.load_pretrained(tmp_path / "mocov3.pth.tar", strict=True)
    assert report.wrappers == ["state_dict"]
    assert torch.equal(ours.last_block.attn.proj.weight, base["blocks.2.attn.proj.weight"])
    assert {"head.0.weight", "predictor.0.weight", "momentum_encoder.cls_token"} <= set(report.unexpected)


def test_msn_target_encoder_checkpoint(tmp_path):
    """MSN (read by PersonViT's loader): {'encoder', 'target_encoder' (module.*), 'prototypes', ...}: the target."""
    base = tiny_timm_vit(num_classes=0).state_dict()
    torch.save({"encoder": {f"module.{k}": v + 1.0 for k, v in base.items()},
                "target_encoder": {f"module.{k}": v for k, v in base.items()},
                "prototypes": torch.randn(10, 32), "epoch": 50}, tmp_path / "msn.pth.tar")
    ours = ReIDViT(**SMALL)
    report = ours.load_pretrained(tmp_path / "msn.pth.tar", strict=True)
    assert report.wrappers == ["target_encoder"] and report.unexpected == []
    assert torch.equal(ours.blocks[0].mlp.fc1.weight, base["blocks.0.mlp.fc1.weight"])


def test_reidvit_state_dict_round_trip(tmp_path):
    """An AMFOR run's backbone (ReIDViT's own names: `last_block` apart) loads back unchanged."""
    src = scrambled(ReIDViT(**SMALL, num_cameras=2))
    torch.save({"model": {f"backbone.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "best.pt")
    ours = ReIDViT(**SMALL, num_cameras=2)
    report = ours.load_pretrained(tmp_path / "best.pt", strict=True)
    assert report.missing == [] and report.unexpected == [] and report.resampled == []
    for key, value in src.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
