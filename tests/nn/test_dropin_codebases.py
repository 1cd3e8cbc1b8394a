"""amfor.nn on the ViT classes of the ReID codebases people run: TransReID, PASS, HAP, CLIP-ReID (TSD builds on the
TransReID and CLIP-ReID classes). Each stand-in below mirrors its codebase's attribute names and forward order
(tiny: 2 blocks, width 32, 64x32 images); the patched computations are checked against the model's own forward.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from amfor.nn import (
    MAEDecoder,
    ViTLayoutError,
    apply_patch_dropout,
    apply_query_fusion_pool,
    describe_vit,
    masked_forward_features,
    query_fusion_features,
)
from amfor.ops import random_masking

timm = pytest.importorskip("timm")  # the token-first stand-ins use timm's Block, as TransReID's Block is timm's
from timm.models.vision_transformer import Block, VisionTransformer  # noqa: E402

D, HEADS, IMG = 32, 2, (64, 32)


def _randomize(model: nn.Module) -> nn.Module:
    """Every parameter non-trivial (zero-initialised tokens and positions would hide an order mistake)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


class OverlapPatchEmbed(nn.Module):
    """TransReID's `PatchEmbed_overlap` / PASS's `PatchEmbed`: a stride-s conv, grid num_y x num_x."""

    def __init__(self, img_size=IMG, patch_size=16, stride_size=12, in_chans=3, embed_dim=D):
        super().__init__()
        self.num_y = (img_size[0] - patch_size) // stride_size + 1
        self.num_x = (img_size[1] - patch_size) // stride_size + 1
        self.num_patches, self.img_size, self.patch_size = self.num_y * self.num_x, img_size, (patch_size, patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride_size)

    def forward(self, x):
        assert tuple(x.shape[-2:]) == tuple(self.img_size)
        return self.proj(x).flatten(2).transpose(1, 2)


def _sie_table(camera: int, view: int) -> nn.Parameter | None:
    """TransReID's SIE table: camera * view rows, or camera, or view (only when there are more than one)."""
    rows = camera * view if camera > 1 and view > 1 else camera if camera > 1 else view if view > 1 else 0
    return nn.Parameter(torch.zeros(rows, 1, D)) if rows else None


class TransReID(nn.Module):
    """TransReID's `TransReID` (model/backbones/vit_pytorch.py): SIE on every token, `forward_features` -> CLS."""

    def __init__(self, stride_size=12, camera=0, view=0, sie_xishu=1.5, depth=2):
        super().__init__()
        self.patch_embed = OverlapPatchEmbed(stride_size=stride_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, D))
        self.cam_num, self.view_num, self.sie_xishu = camera, view, sie_xishu
        table = _sie_table(camera, view)
        if table is not None:
            self.sie_embed = table
        self.pos_drop = nn.Dropout(p=0.0)
        self.blocks = nn.ModuleList([Block(D, HEADS, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(D, eps=1e-6)

    def forward_features(self, x, camera_id, view_id):
        B = x.shape[0]
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        if self.cam_num > 0 and self.view_num > 0:
            x = x + self.pos_embed + self.sie_xishu * self.sie_embed[camera_id * self.view_num + view_id]
        elif self.cam_num > 0:
            x = x + self.pos_embed + self.sie_xishu * self.sie_embed[camera_id]
        elif self.view_num > 0:
            x = x + self.pos_embed + self.sie_xishu * self.sie_embed[view_id]
        else:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]


class PASS(nn.Module):
    """PASS-reID's `TransReID`: three part tokens after the CLS token, their own positions (`cls_pos`, `part1_pos`..)
    and a patch-only `pos_embed` [1, N, D]. (PASS's SIE branch adds that pos_embed to all 4 + N tokens, a shape
    error; the stand-in adds the full positions there, as its branch without SIE does.)"""

    def __init__(self, stride_size=12, camera=0, sie_xishu=1.5):
        super().__init__()
        self.patch_embed = OverlapPatchEmbed(stride_size=stride_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.part_token1, self.part_token2, self.part_token3 = (nn.Parameter(torch.zeros(1, 1, D)) for _ in range(3))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, D))
        self.part1_pos, self.part2_pos, self.part3_pos = (nn.Parameter(torch.zeros(1, 1, D)) for _ in range(3))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, D))
        self.cam_num, self.view_num, self.sie_xishu = camera, 0, sie_xishu
        table = _sie_table(camera, 0)
        if table is not None:
            self.sie_embed = table
        self.pos_drop = nn.Dropout(p=0.0)
        self.blocks = nn.ModuleList([Block(D, HEADS, qkv_bias=True) for _ in range(2)])
        self.norm = nn.LayerNorm(D, eps=1e-6)

    def forward_features(self, x, camera_id, view_id):
        B = x.shape[0]
        x = self.patch_embed(x)
        parts = [t.expand(B, -1, -1) for t in (self.cls_token, self.part_token1, self.part_token2, self.part_token3)]
        x = torch.cat((*parts, x), dim=1)
        pos = torch.cat((self.cls_pos, self.part1_pos, self.part2_pos, self.part3_pos, self.pos_embed), dim=1)
        if self.cam_num > 0:
            x = x + pos + self.sie_xishu * self.sie_embed[camera_id]
        else:
            x = x + pos
        x = self.pos_drop(x)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x[:, 0], x[:, 1], x[:, 2], x[:, 3]


class HAP(VisionTransformer):
    """HAP's ReID `VisionTransformer` (downstream_tasks/person_reid/models/models_vit.py): a timm subclass with its
    own `forward_features` (no `patch_drop`, no `norm_pre`); with global pooling it deletes `norm` for `fc_norm`."""

    def __init__(self, global_pool=False):
        super().__init__(img_size=IMG, patch_size=16, embed_dim=D, depth=2, num_heads=HEADS, num_classes=0)
        self.global_pool = global_pool
        if global_pool:
            self.fc_norm = nn.LayerNorm(D, eps=1e-6)
            del self.norm

    def forward_features(self, x):
        B = x.shape[0]
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = self.pos_drop(x + self.pos_embed)
        for blk in self.blocks:
            x = blk(x)
        if self.global_pool:
            return self.fc_norm(x[:, 1:, :].mean(dim=1))
        return self.norm(x)[:, 0]


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """CLIP's block: nn.MultiheadAttention on [N, B, D]."""

    def __init__(self, d_model, n_head):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1, self.ln_2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d_model, 4 * d_model)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(4 * d_model, d_model))]))

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])


class CLIPReIDVisual(nn.Module):
    """CLIP-ReID's visual `VisionTransformer` (model/clip/model.py): overlapping `conv1`, `cv_emb` [B, D] added to
    the CLS token before the positions, `ln_pre`, blocks on [N, B, D], `ln_post`, `proj`."""

    def __init__(self, stride_size=12, output_dim=16):
        super().__init__()
        self.h_resolution = (IMG[0] - 16) // stride_size + 1
        self.w_resolution = (IMG[1] - 16) // stride_size + 1
        self.conv1 = nn.Conv2d(3, D, kernel_size=16, stride=stride_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(D))
        self.positional_embedding = nn.Parameter(torch.randn(self.h_resolution * self.w_resolution + 1, D))
        self.ln_pre = nn.LayerNorm(D)
        self.transformer = Transformer(D, 2, HEADS)
        self.ln_post = nn.LayerNorm(D)
        self.proj = nn.Parameter(torch.randn(D, output_dim))

    def forward(self, x, cv_emb=None):
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
        if cv_emb is not None:
            x[:, 0] = x[:, 0] + cv_emb
        x = self.ln_pre(x + self.positional_embedding.to(x.dtype))
        x = x.permute(1, 0, 2)
        x11 = self.transformer.resblocks[:1](x)
        x12 = self.transformer.resblocks[1](x11)
        x12 = self.ln_post(x12.permute(1, 0, 2))
        return x11.permute(1, 0, 2), x12, x12 @ self.proj


# -- each codebase: (model, forward with side information, the patched view's tokens that forward returns) ---------
CAMS, VIEWS = torch.tensor([2, 0]), torch.tensor([1, 0])
CV_EMB = torch.randn(2, D, generator=torch.Generator().manual_seed(1))

CASES = {
    "transreid": (lambda: TransReID(), lambda m, x: m.forward_features(x, None, None), {}),
    "transreid_stride16": (lambda: TransReID(stride_size=16), lambda m, x: m.forward_features(x, None, None), {}),
    "transreid_sie_cam": (lambda: TransReID(camera=3), lambda m, x: m.forward_features(x, CAMS, None),
                          {"camera_id": CAMS}),
    "transreid_sie_cam_view": (lambda: TransReID(camera=3, view=2), lambda m, x: m.forward_features(x, CAMS, VIEWS),
                               {"camera_id": CAMS, "view_id": VIEWS}),
    "pass": (lambda: PASS(), lambda m, x: torch.stack(m.forward_features(x, None, None), 1), {}),
    "pass_sie": (lambda: PASS(camera=3), lambda m, x: torch.stack(m.forward_features(x, CAMS, None), 1),
                 {"camera_id": CAMS}),
    "hap": (lambda: HAP(), lambda m, x: m.forward_features(x), {}),
    "clip": (lambda: CLIPReIDVisual(), lambda m, x: m(x)[1], {}),
    "clip_sie": (lambda: CLIPReIDVisual(), lambda m, x: m(x, CV_EMB)[1], {"cv_emb": CV_EMB}),
}


# HAP without global pooling is a plain timm sequence, which the masked forward handled before: its own test below
MASKED = [case for case in CASES if case != "hap"]


def _pick(case: str, tokens: torch.Tensor) -> torch.Tensor:
    """The part of the full token output [B, P + N, D] that the codebase's forward returns."""
    if case.startswith("pass"):
        return tokens[:, :4]
    return tokens if case.startswith("clip") else tokens[:, 0]


def _images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *IMG, generator=torch.Generator().manual_seed(2))


def _block_input(model: nn.Module, run) -> torch.Tensor:
    """The tokens the model's own forward gives its first block, as [B, L, D] (CLIP's blocks take [L, B, D])."""
    parts = describe_vit(model)
    seen = []
    handle = parts.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        run()
    finally:
        handle.remove()
    return seen[0].transpose(0, 1) if parts.seq_first else seen[0]


@pytest.mark.parametrize("case", MASKED)
def test_masked_forward_with_every_patch_equals_the_models_forward(case):
    build, forward, side = CASES[case]
    model, images = _randomize(build()), _images()
    N = describe_vit(model).grid[0] * describe_vit(model).grid[1]
    full = masked_forward_features(model, images, torch.arange(N).expand(2, N), **side)
    torch.testing.assert_close(_pick(case, full), forward(model, images))


@pytest.mark.parametrize("case", MASKED)
def test_masked_forward_equals_the_blocks_on_the_gathered_tokens(case):
    """The kept tokens (prefix first) of the model's own embedding, run through its blocks and final norm by hand."""
    build, forward, side = CASES[case]
    model, images = _randomize(build()), _images()
    parts = describe_vit(model)
    P, N = parts.num_prefix_tokens, parts.grid[0] * parts.grid[1]
    index, _ = random_masking(2, N, 3, generator=torch.Generator().manual_seed(3))
    tokens = _block_input(model, lambda: forward(model, images))  # [B, P + N, D]
    keep = torch.cat([torch.arange(P).expand(2, P), index + P], dim=1)
    x = torch.gather(tokens, 1, keep[..., None].expand(-1, -1, D))
    x = x.transpose(0, 1) if parts.seq_first else x
    for blk in parts.blocks:
        x = blk(x)
    x = x.transpose(0, 1) if parts.seq_first else x
    expected = model.ln_post(x) if case.startswith("clip") else model.norm(x)
    torch.testing.assert_close(masked_forward_features(model, images, index, **side), expected)


def test_overlapping_stride_gives_transreids_grid():
    """16x16 patches every 12 pixels on 64x32: ((64 - 16) // 12 + 1, (32 - 16) // 12 + 1) = (5, 2)."""
    for model in (TransReID(), PASS(), CLIPReIDVisual()):
        parts = describe_vit(model)
        assert parts.grid == (5, 2)
        assert parts.num_prefix_tokens == (4 if isinstance(model, PASS) else 1)
    decoder = MAEDecoder.for_vit(PASS(), 3 * 16 * 16, decoder_dim=16, depth=1, num_heads=2)
    assert (decoder.num_patches, decoder.num_prefix_tokens) == (10, 4)
    latent, index = torch.randn(2, 4 + 3, D), torch.tensor([[0, 4, 9], [1, 2, 3]])
    assert decoder(latent, index).shape == (2, 10, 3 * 16 * 16)


def test_hap_with_global_pooling_has_no_final_norm():
    model, images = _randomize(HAP(global_pool=True)), _images()
    N = describe_vit(model).grid[0] * describe_vit(model).grid[1]
    tokens = masked_forward_features(model, images, torch.arange(N).expand(2, N))
    torch.testing.assert_close(model.fc_norm(tokens[:, 1:].mean(1)), model.forward_features(images))


@pytest.mark.parametrize("case", ["transreid", "transreid_sie_cam_view", "pass_sie", "hap", "clip_sie"])
def test_patch_dropout_keeps_the_prefix_and_a_subset_of_patches(case):
    build, forward, side = CASES[case]
    model, images = _randomize(build()), _images()
    parts = describe_vit(model)
    P, N = parts.num_prefix_tokens, parts.grid[0] * parts.grid[1]
    expected = forward(model, images)
    full = _block_input(model, lambda: forward(model, images))

    apply_patch_dropout(model, 0.5)
    torch.testing.assert_close(forward(model, images), expected)  # eval: no dropout
    model.train()
    kept = _block_input(model, lambda: forward(model, images))
    K = int(N * 0.5)
    assert kept.shape == (2, P + K, D)
    torch.testing.assert_close(kept[:, :P], full[:, :P])
    match = torch.cdist(kept[:, P:], full[:, P:]).argmin(-1)  # [B, K]: which patch each kept token is
    assert bool((match[:, 1:] > match[:, :-1]).all())
    torch.testing.assert_close(kept[:, P:], torch.gather(full[:, P:], 1, match[..., None].expand(-1, -1, D)))
    # the masked view chooses its tokens itself: no dropout on top in training
    index = torch.arange(N).expand(2, N)
    masked = masked_forward_features(model, images, index, **side)
    torch.testing.assert_close(_pick(case, masked), expected)

    apply_patch_dropout(model, 0.0)  # replaces the previous hook: keep ratio 1 is the unpatched model
    torch.testing.assert_close(forward(model, images), expected)


@pytest.mark.parametrize("case", ["transreid_sie_cam_view", "pass", "hap", "clip_sie"])
def test_query_fusion_pool_reads_the_normed_patch_tokens_and_trains(case):
    build, forward, side = CASES[case]
    model, images = _randomize(build()), _images()
    parts = describe_vit(model)
    P, N = parts.num_prefix_tokens, parts.grid[0] * parts.grid[1]
    apply_query_fusion_pool(model, layers=(-1,))
    seen = []
    model.query_fusion_pool.pool.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    query_fusion_features(model, images, **side)
    last = masked_forward_features(model, images, torch.arange(N).expand(2, N), **side)[:, P:]
    torch.testing.assert_close(seen[0][0], last)

    apply_query_fusion_pool(model, layers=(-2, -1))
    model.train()
    feats = query_fusion_features(model, images, **side)
    assert feats.shape == (2, D) and bool(torch.isfinite(feats).all())
    feats.square().sum().backward()
    assert model.query_fusion_pool.pool.attn.layer_logits.grad is not None
    first = model.conv1.weight if case.startswith("clip") else model.patch_embed.proj.weight
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_clip_position_embedding_is_resampled_for_another_image_size():
    """CLIP's conv takes any size: a 88x44 image gives a (7, 3) grid, the positions are resampled bilinearly from
    (5, 2), as CLIP-ReID's `resize_pos_embed` does when it loads CLIP's weights."""
    model = _randomize(CLIPReIDVisual())
    images = torch.randn(2, 3, 88, 44)
    tokens = masked_forward_features(model, images, torch.arange(21).expand(2, 21))
    pos = model.positional_embedding.detach()
    grid = pos[1:].reshape(1, 5, 2, D).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, size=(7, 3), mode="bilinear").permute(0, 2, 3, 1).reshape(21, D)
    with torch.no_grad():
        model.positional_embedding = nn.Parameter(torch.cat([pos[:1], grid]))
        model.h_resolution, model.w_resolution = 7, 3
    torch.testing.assert_close(tokens, model(images)[1])


class NoPositions(nn.Module):
    """A ViT-like class without a position embedding."""

    def __init__(self):
        super().__init__()
        self.patch_embed = OverlapPatchEmbed()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_drop = nn.Dropout(0.0)
        self.blocks = nn.ModuleList([Block(D, HEADS)])


class CLIPWithoutLnPre(CLIPReIDVisual):
    def __init__(self):
        super().__init__()
        del self.ln_pre


@pytest.mark.parametrize(("model", "absent"), [(NoPositions(), "`pos_embed`"), (CLIPWithoutLnPre(), "`ln_pre`")])
def test_a_class_missing_a_part_gets_a_clear_error(model, absent):
    name = type(model).__name__
    calls = [lambda: masked_forward_features(model, _images(), torch.tensor([[0], [1]])),
             lambda: apply_patch_dropout(model, 0.5),
             lambda: apply_query_fusion_pool(model, layers=(-1,)),
             lambda: MAEDecoder.for_vit(model, 8)]
    for call in calls:
        with pytest.raises(ValueError, match=name) as err:
            call()
        assert absent in str(err.value) and isinstance(err.value, ViTLayoutError)


def test_patch_dropout_is_replaced_in_a_deep_copy_only():
    """Re-applying on a copy (an EMA teacher, say) changes the copy's hook, not the original's."""
    model = _randomize(TransReID())
    apply_patch_dropout(model, 0.5)
    twin = copy.deepcopy(model)
    apply_patch_dropout(twin, 0.0)
    model.train(), twin.train()
    images = _images()
    assert _block_input(model, lambda: model.forward_features(images, None, None)).shape[1] == 1 + 5
    assert _block_input(twin, lambda: twin.forward_features(images, None, None)).shape[1] == 1 + 10


def test_the_transreid_snippet_of_the_docs_runs():
    """docs/drop-in.md, "A TransReID model in five lines", on the stand-in with SIE (3 cameras, 2 views), stride 12."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "drop-in.md").read_text()
    block = text.split("## A TransReID model in five lines", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    vit = _randomize(TransReID(camera=3, view=2))
    scope = {"model": SimpleNamespace(base=vit), "images": _images(), "cam_label": CAMS, "view_label": VIEWS}
    exec(block, scope)  # noqa: S102 - the documented snippet itself
    assert isinstance(vit.patch_dropout, nn.Module) and scope["index"].shape == (2, 10 // 4)
    latent, index = scope["latent"], scope["index"]
    torch.testing.assert_close(latent, masked_forward_features(vit, _images(), index, camera_id=CAMS, view_id=VIEWS))
    assert latent.shape == (2, 1 + 2, D) and scope["feat"].shape == (2, D)
    assert MAEDecoder.for_vit(vit, 3 * 16 * 16)(latent, index).shape == (2, 10, 3 * 16 * 16)


def test_query_fusion_pool_on_amfors_own_backbone_reads_its_global_branch():
    """ReIDViT: blocks then `last_block`; the last layer pooled is the global branch G (without CLS)."""
    from amfor.models.backbone import ReIDViT

    torch.manual_seed(0)
    vit = ReIDViT(img_size=IMG, patch_size=16, stride=12, embed_dim=D, depth=3, num_heads=HEADS, num_cameras=2,
                  drop_path_rate=0.0).eval()
    apply_query_fusion_pool(vit, layers=(-2, -1))
    seen = []
    vit.query_fusion_pool.pool.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    cams = torch.tensor([1, 0])
    assert query_fusion_features(vit, _images(), camera_id=cams).shape == (2, D)
    memory, global_branch = vit.forward_features(_images(), cams)
    torch.testing.assert_close(seen[0][1], global_branch[:, 1:])
    torch.testing.assert_close(seen[0][0], vit.norm(memory)[:, 1:])


def test_side_information_of_the_wrong_kind_or_shape_is_named():
    images = _images()
    with pytest.raises(ValueError, match="cv_emb must be"):
        masked_forward_features(_randomize(CLIPReIDVisual()), images, torch.tensor([[0], [1]]), cv_emb=CV_EMB[:1])
    with pytest.raises(ValueError, match="camera_id/view_id"):
        masked_forward_features(_randomize(TransReID(camera=3)), images, torch.tensor([[0], [1]]), cv_emb=CV_EMB)
