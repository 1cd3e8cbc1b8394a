"""TransReID-style ViT backbone of AMFOR (docs/spec.md section 1), made of timm's parts, and its weight loading.

Overlapping patch embedding (a timm `PatchEmbed` whose conv has stride s <= p), a learned position embedding
on the ny x nx grid (ny = (H - p) // s + 1), side information embedding (one learned vector per camera, scaled
by `sie_coef`) added to all tokens, timm `Block`s 1..depth-1 producing the shared memory M, and a separate
copy of block `depth` plus the final LayerNorm producing the global branch G (g = G[:, 0]).

The backbone owns its embedding, as timm's ViT its `_pos_embed`: `embed(images, camids, index)` builds the input
tokens (all patches, or with a kept-token index only the kept ones, through `masked_gather`); the AMFOR model and
its masked view read the tokens from there, never `pos_embed` itself.

Weights load with `ReIDViT.load_pretrained` from timm, TransReID, CLIP / CLIP-ReID, DINO-family (PASS,
TransReID-SSL, PersonViT), MAE (HAP) and MoCo v3 checkpoints: `amfor/models/weights.py` reads and converts them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from timm.layers import LayerNorm, PatchEmbed, calculate_drop_path_rates, trunc_normal_
from timm.models.vision_transformer import Block, init_weights_vit_timm
from torch import nn

from amfor.models import weights
from amfor.models.inputs import check_ids, check_images, check_ranges, tracing  # noqa: F401
from amfor.models.weights import (  # noqa: F401  (re-exported: the loading API used to live here)
    LoadReport,
    checkpoint_filter_fn,
    filter_checkpoint,
    infer_grid,
    load_state_dict_file,
)
from amfor.nn.masked_vit import embed_tokens
from amfor.nn.patch_grid import grid_size


class ReIDViT(nn.Module):
    """ViT with overlapping patches, camera embedding and a separate last block for the global branch.

    img_size: (H, W); patch_size p and stride s give the grid ny x nx = ((H - p)//s + 1, (W - p)//s + 1) of
    N tokens; num_cameras > 0 adds SIE (sie_coef * sie_embed[camid] on all 1 + N tokens; camid -1 or camids=None:
    an unknown camera, the cameras' mean embedding; sie_coef = 0 turns it off: no sie_embed, camera ids ignored);
    drop_path_rate
    grows linearly over the `depth` blocks as in timm (last_block gets the last rate); drop_rate is the
    dropout after the position embedding and in the blocks' projections.
    """

    def __init__(self, img_size: tuple[int, int] = (256, 128), patch_size: int = 16, stride: int = 16,
                 in_chans: int = 3, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1, num_cameras: int = 0,
                 sie_coef: float = 3.0) -> None:
        super().__init__()
        self.img_size = (int(img_size[0]), int(img_size[1])) if isinstance(img_size, tuple | list) else (
            int(img_size), int(img_size))
        if not 0 < stride <= patch_size or min(self.img_size) < patch_size:
            raise ValueError(f"need 0 < stride <= patch_size <= min(img_size), got stride {stride}, "
                             f"patch_size {patch_size}, img_size {self.img_size}")
        if depth < 2:
            raise ValueError(f"depth must be >= 2 (shared blocks plus the last block), got {depth}")
        if num_cameras < 0:
            raise ValueError(f"num_cameras must be >= 0, got {num_cameras}")
        if sie_coef < 0:
            raise ValueError(f"sie_coef must be >= 0 (0 turns the camera embedding off), got {sie_coef}")
        self.patch_size, self.stride, self.in_chans = patch_size, stride, in_chans
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.num_prefix_tokens, self.num_cameras, self.sie_coef = 1, num_cameras, sie_coef
        self.grid_size = grid_size(self.img_size, patch_size, stride)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

        self.patch_embed = PatchEmbed(self.img_size, patch_size, in_chans, embed_dim)
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride)
        self.patch_embed.grid_size, self.patch_embed.num_patches = self.grid_size, self.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, embed_dim))
        sie = num_cameras > 0 and sie_coef > 0
        self.sie_embed = nn.Parameter(torch.zeros(num_cameras, 1, embed_dim)) if sie else None
        self.pos_drop = nn.Dropout(drop_rate)

        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        block = lambda i: Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate,
                                attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=LayerNorm, depth=i)
        self.blocks = nn.ModuleList([block(i) for i in range(depth - 1)])
        self.last_block = block(depth - 1)
        self.norm = LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        """timm's ViT init: trunc-normal(0.02) Linear weights, zero biases; pos/SIE trunc-normal, CLS ~ 1e-6."""
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.sie_embed is not None:
            trunc_normal_(self.sie_embed, std=0.02)
        self.apply(lambda m: init_weights_vit_timm(m, needs_reset=False))

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"} | ({"sie_embed"} if self.sie_embed is not None else set())

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Raw patch embedding: [B, in_chans, H, W] -> [B, N, D] (no position embedding)."""
        check_images(x, self.in_chans, self.img_size)
        return self.patch_embed(x)

    def check_inputs(self, x: torch.Tensor, camids: torch.Tensor | None) -> None:
        """The entry check of a standalone backbone: images [B, in_chans, H, W], camids [B] in [-1, num_cameras)
        or None (see amfor/models/inputs.py); camids are ignored by a backbone without cameras."""
        check_images(x, self.in_chans, self.img_size)
        if self.sie_embed is not None and camids is not None:
            check_ids(camids, x.shape[0], "camids")
            check_ranges(None, 0, camids, self.num_cameras)

    def camera_embedding(self, camids: torch.Tensor | None, batch: int,
                         seen: torch.Tensor | None = None) -> torch.Tensor | None:
        """SIE term [B, 1, D] = sie_coef * sie_embed[camids] for camids [B] (checked by the caller); None without
        cameras (or with sie_coef = 0: camera ids are then ignored).

        An unknown camera (camid -1, or every image when camids is None) and a camera that `seen` [num_cameras]
        (bool, the cameras seen in training; None: all) marks unseen get the mean embedding of the seen cameras
        (docs/model.md, "Cameras").
        """
        if self.sie_embed is None:
            return None
        table = self.sie_embed  # [K, 1, D]
        weight = table.new_ones(self.num_cameras) if seen is None else seen.to(table.dtype)
        mean = (table * weight[:, None, None]).sum(0) / weight.sum().clamp(min=1)  # [1, D]
        if camids is None:
            return self.sie_coef * mean.expand(batch, 1, -1)
        cams = camids.long().clamp(min=0)
        known = camids >= 0 if seen is None else (camids >= 0) & seen[cams]
        return self.sie_coef * torch.where(known[:, None, None], table[cams], mean)

    def embed(self, x: torch.Tensor, camids: torch.Tensor | None = None, index: torch.Tensor | None = None, *,
              seen: torch.Tensor | None = None, patches: torch.Tensor | None = None,
              check_index: bool = True) -> torch.Tensor:
        """The input tokens x_0 [B, 1 + N', D]: CLS and the patch tokens with their position embedding, plus the
        camera embedding (`camera_embedding(camids, B, seen)`), after pos_drop (timm's `_pos_embed`).

        x: images [B, in_chans, H, W]; index: [B, K] kept patch numbers (the masked view: only they are embedded,
        through `masked_gather`; N' = K) or None (all: N' = N); patches: the images' patch embedding [B, N, D]
        when already computed (`patch_tokens`: a full and a masked view share it); check_index=False skips the
        value check of `index` (a host sync), for indices the caller made.
        """
        patches = self.patch_tokens(x) if patches is None else patches
        pos = self.pos_embed[0]
        x = embed_tokens(patches, pos[1:], self.cls_token, pos[:1], index, check_index=check_index)
        sie = self.camera_embedding(camids, x.shape[0], seen)
        return self.pos_drop(x if sie is None else x + sie)

    def forward_intermediates(self, x: torch.Tensor, camids: torch.Tensor | None = None) -> list[torch.Tensor]:
        """[x_0, x_1, ..., x_{depth-1}], each [B, 1 + N, D]: x_0 = embed(x), x_i after shared block i."""
        self.check_inputs(x, camids)
        xs = [self.embed(x, camids)]
        for blk in self.blocks:
            xs.append(blk(xs[-1]))
        return xs

    def forward_features(self, x: torch.Tensor,
                         camids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, G), both [B, 1 + N, D]: M = x_{depth-1} (shared memory), G = norm(last_block(M)) (global branch)."""
        self.check_inputs(x, camids)
        m = self.embed(x, camids)
        for blk in self.blocks:
            m = blk(m)
        return m, self.norm(self.last_block(m))

    def forward(self, x: torch.Tensor, camids: torch.Tensor | None = None) -> torch.Tensor:
        """Global feature g = G[:, 0]: [B, D]."""
        return self.forward_features(x, camids)[1][:, 0]

    def load_pretrained(self, path: str | Path, strict: bool = False,
                        old_grid: tuple[int, int] | None = None) -> LoadReport:
        """Load a checkpoint file (timm, TransReID, CLIP-ReID, PASS, ...: `amfor.models.weights`); the report.

        strict: raise if any backbone weight is missing (unexpected checkpoint keys are always allowed and
        reported). A checkpoint sharing no weight with the backbone is an error either way.
        """
        return weights.load_pretrained(self, path, strict, old_grid)
