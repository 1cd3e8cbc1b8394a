"""One description of a ViT's parts, whichever ReID codebase wrote the class: what `amfor.nn`'s helpers read.

`describe_vit(model)` finds, by attribute names, the parts every ViT has and returns a `ViTParts`: the patch
embedding, the learned prefix tokens (CLS, registers, part tokens) and their positions, the patch position
embedding on its grid (resampled bilinearly when the image gives another grid), the side information (SIE), the
token-wise modules between embedding and blocks, the blocks with their token layout, the final norm. Two layouts
are known (docs/drop-in.md, "Other ReID codebases"):

- token-first (`[B, N, D]` through the blocks): timm's `VisionTransformer` and its subclasses (HAP and MAE-style
  fine-tuning), TransReID (`patch_embed` with overlapping stride, `cls_token`, `pos_embed` [1, 1 + N, D], SIE
  `sie_xishu * sie_embed[camera_id * view_num + view_id]` added to every token, `pos_drop`, `blocks`, `norm`),
  PASS / TransReID-SSL (`part_token1..3` after the CLS token, their own `cls_pos`, `part1_pos`.. and a patch-only
  `pos_embed` [1, N, D]) and amfor's `ReIDViT` (which owns its embedding: `embed(images, camids, index)`).
- CLIP (`[N, B, D]` through `transformer.resblocks`): OpenAI CLIP's and CLIP-ReID's visual `VisionTransformer`
  (`conv1`, `class_embedding`, `positional_embedding` [1 + N, D], `ln_pre`, `ln_post`, `proj`); CLIP-ReID's side
  embedding `cv_emb` [B, D] (its wrapper computes `sie_coe * cv_embed[...]`) is added to the CLS token only.

A model matching neither gets a `ViTLayoutError` (a ValueError) naming its class and the attributes it lacks.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from amfor.nn.masked_vit import embed_tokens
from amfor.nn.patch_grid import grid_size

TOKEN_FIRST = ("patch_embed", "pos_embed", "cls_token", "blocks")
CLIP = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer.resblocks")
_PART_TOKEN = re.compile(r"part_token(\d+)$")


class ViTLayoutError(ValueError, TypeError):
    """A model whose attributes match no ViT layout amfor.nn knows (a ValueError; a TypeError too, as the timm-only
    helpers raised before)."""


def _get(model: nn.Module, path: str):
    for name in path.split("."):
        if not hasattr(model, name):
            return None, False
        model = getattr(model, name)
    return model, True


def _missing(model: nn.Module, names: tuple[str, ...]) -> list[str]:
    return [n for n in names if not _get(model, n)[1]]


def layout_error(model: nn.Module, what: str = "") -> ViTLayoutError:
    """The error for a model of no known layout: its class and the attributes of the nearer layout it lacks."""
    token_first, clip = _missing(model, TOKEN_FIRST), _missing(model, CLIP)
    if len(clip) < len(token_first):
        absent, layout = clip, "a CLIP visual ViT"
    else:
        absent, layout = token_first, "a timm / TransReID-style ViT"
    lead = f"{what}: " if what else ""
    return ViTLayoutError(f"{lead}{type(model).__name__} is not a ViT amfor.nn can read: it has no "
                          f"{', '.join(f'`{n}`' for n in absent)} (the attributes of {layout})")


def uses_timm_forward(model: nn.Module) -> bool:
    """A timm VisionTransformer running timm's own `forward_features` (which calls `patch_drop` and `norm_pre`);
    False for a subclass with its own forward (HAP, MAE fine-tuning) and without timm."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return False
    return isinstance(model, VisionTransformer) and type(model).forward_features is VisionTransformer.forward_features


def resample_pos_embed(pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Patch position embedding [ny * nx, D] on old_grid -> [ny' * nx', D] on new_grid (bilinear, as TransReID's and
    CLIP-ReID's `resize_pos_embed`); unchanged when the grids agree."""
    if tuple(old_grid) == tuple(new_grid):
        return pos
    grid = pos.reshape(1, old_grid[0], old_grid[1], -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bilinear")
    return grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], -1)


@dataclass
class ViTParts:
    """The parts of one ViT (see the module docstring). `family`: "timm", "amfor" (ReIDViT), "transreid" (TransReID,
    PASS and any other token-first ViT) or "clip"; `num_prefix_tokens` P; `embed_dim` D; `grid` (ny, nx) the
    position embedding was made for; `blocks` in order; `seq_first`: the blocks take [N, B, D]; `norm`: the final
    norm (Identity when the model has none, e.g. HAP with global pooling); `drop_site`: the attribute after which
    patch dropout goes (timm's `patch_drop`, else `pos_drop` or CLIP's `ln_pre`)."""

    family: str
    vit: nn.Module
    num_prefix_tokens: int
    embed_dim: int
    grid: tuple[int, int]
    blocks: list[nn.Module]
    seq_first: bool
    norm: nn.Module
    drop_site: str | None

    @property
    def num_heads(self) -> int | None:
        """Heads of the first block's attention (timm `Attention`, TransReID's, nn.MultiheadAttention), or None."""
        return getattr(getattr(self.blocks[0], "attn", None), "num_heads", None)

    # -- embedding ------------------------------------------------------------------------------------------
    def patch_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """images [B, C, H, W] -> (patch embedding [B, N, D] without position, the input's grid (ny, nx))."""
        if self.family == "clip":
            x = self.vit.conv1(images)  # [B, D, ny, nx]
            return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])
        x = self.vit.patch_embed(images)
        if x.dim() == 4:  # timm PatchEmbed(flatten=False): [B, ny, nx, D]
            return x.flatten(1, 2), (x.shape[1], x.shape[2])
        N = x.shape[1]
        if N == self.grid[0] * self.grid[1]:
            return x, self.grid
        proj = getattr(self.vit.patch_embed, "proj", None)
        if isinstance(proj, nn.Conv2d):
            grid = grid_size(images.shape[-2:], proj.kernel_size[0], proj.stride[0])
            if grid[0] * grid[1] == N:
                return x, grid
        raise ValueError(f"{type(self.vit).__name__}: the patch embedding gave {N} tokens, not the {self.grid} grid "
                         f"its position embedding was made for, and its grid for images "
                         f"{tuple(images.shape[-2:])} cannot be told")

    def _positions(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(prefix tokens [1, P, D] or None, their positions [P, D] or None, patch positions [N0, D] or None)."""
        vit, P = self.vit, self.num_prefix_tokens
        if self.family == "clip":
            pos = vit.positional_embedding
            pos = pos[0] if pos.dim() == 3 else pos
            return vit.class_embedding.reshape(1, 1, -1), pos[:1], pos[1:]
        tokens = [getattr(vit, "cls_token", None), getattr(vit, "reg_token", None)]
        tokens += [getattr(vit, name) for name in _part_token_names(vit)]
        tokens = [t for t in tokens if t is not None]
        prefix = torch.cat(tokens, dim=1) if tokens else None
        pos = vit.pos_embed[0] if vit.pos_embed is not None else None
        if pos is None:
            return prefix, None, None
        if _prefix_in_pos_embed(vit, self.family):
            return prefix, pos[:P], pos[P:]
        if hasattr(vit, "cls_pos"):  # PASS: the prefix tokens' positions are parameters of their own
            separate = [vit.cls_pos] + [getattr(vit, f"part{i}_pos") for i in range(1, P)]
            return prefix, torch.cat(separate, dim=1)[0], pos
        return prefix, None, pos  # timm no_embed_class: the prefix tokens have no position

    def side_embedding(self, batch: int, camera_id: torch.Tensor | None,
                       view_id: torch.Tensor | None) -> torch.Tensor | None:
        """TransReID / PASS SIE [B, 1, D] = sie_xishu * sie_embed[camera_id * view_num + view_id] (or [camera_id],
        [view_id] when the model has cameras or views only); None without a table or without ids."""
        table = getattr(self.vit, "sie_embed", None)
        if table is None or (camera_id is None and view_id is None):
            return None
        views = getattr(self.vit, "view_num", 0)
        if camera_id is not None and view_id is not None and views > 0 and getattr(self.vit, "cam_num", 0) > 0:
            index = camera_id * views + view_id
        else:
            index = camera_id if camera_id is not None else view_id
        return getattr(self.vit, "sie_xishu", 1.0) * table[index.long()].reshape(batch, 1, -1)

    def embed(self, images: torch.Tensor, index: torch.Tensor | None = None, *, camera_id: torch.Tensor | None = None,
              view_id: torch.Tensor | None = None, cv_emb: torch.Tensor | None = None, drop_patches: bool = False,
              check_index: bool = True) -> torch.Tensor:
        """The tokens the first block gets, [B, P + N', D] (token-first, whatever the blocks' layout): prefix tokens
        and patches with their positions (only the kept patches `index` [B, K] when given, gathered with
        `masked_gather`: N' = K), the side information, then the model's token-wise modules (dropout, pre-norm).

        camera_id / view_id [B]: TransReID / PASS SIE (amfor ReIDViT: its camids); cv_emb [B, D]: CLIP-ReID's side
        embedding, added to the CLS token. drop_patches: also run patch dropout put in by `apply_patch_dropout`
        (training only), as the model's own forward does.
        """
        vit = self.vit
        if self.family == "amfor":
            if view_id is not None or cv_emb is not None:
                raise ValueError("amfor's ReIDViT takes its side information as camera_id (its camids) only")
            with _patch_dropout(vit, drop_patches):
                return vit.embed(images, camera_id, index=index, check_index=check_index)
        if self.family == "timm" and getattr(vit, "dynamic_img_size", False):
            raise ValueError("amfor.nn needs a timm ViT with a fixed image size (dynamic_img_size=False)")
        patches, grid = self.patch_tokens(images)
        prefix, prefix_pos, patch_pos = self._positions()
        if patch_pos is not None:
            patch_pos = resample_pos_embed(patch_pos, self.grid, grid)
        if cv_emb is not None:
            if self.family != "clip":
                raise ValueError("cv_emb is CLIP-ReID's side embedding; TransReID-style models take camera_id/view_id")
            if tuple(cv_emb.shape) != (patches.shape[0], self.embed_dim):
                raise ValueError(f"cv_emb must be [B, D] = [{patches.shape[0]}, {self.embed_dim}], "
                                 f"got {list(cv_emb.shape)}")
            prefix = prefix.to(patches.dtype) + cv_emb[:, None]  # CLIP-ReID: x[:, 0] += cv_emb, before the positions
        x = embed_tokens(patches, patch_pos, prefix, prefix_pos, index, check_index=check_index)
        sie = self.side_embedding(x.shape[0], camera_id, view_id)
        x = x if sie is None else x + sie
        with _patch_dropout(vit, drop_patches):
            if self.family == "clip":
                return vit.ln_pre(x)
            if hasattr(vit, "pos_drop"):
                x = vit.pos_drop(x)
            if self.family == "timm":
                x = vit.patch_drop(x) if drop_patches else x
                x = vit.norm_pre(x) if hasattr(vit, "norm_pre") else x
            return x

    # -- blocks ---------------------------------------------------------------------------------------------
    def forward_blocks(self, x: torch.Tensor, every: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Run the blocks on tokens [B, L, D] (permuted to [L, B, D] and back for CLIP's blocks)  ->  the last
        block's output [B, L, D], or with every=True each block's output, in order."""
        x = x.transpose(0, 1) if self.seq_first else x
        outs = []
        for blk in self.blocks:
            x = blk(x)
            if every:
                outs.append(x.transpose(0, 1) if self.seq_first else x)
        if every:
            return outs
        return x.transpose(0, 1) if self.seq_first else x


def _prefix_in_pos_embed(vit: nn.Module, family: str) -> bool:
    """Whether `pos_embed` holds the prefix tokens' positions first (timm unless no_embed_class, TransReID) or
    the patches' only (timm no_embed_class; PASS, whose prefix positions are `cls_pos`, `part1_pos`, ...)."""
    if family == "timm":
        return not getattr(vit, "no_embed_class", False)
    return not hasattr(vit, "cls_pos")


def _part_token_names(vit: nn.Module) -> list[str]:
    """PASS's `part_token1`, `part_token2`, ... in number order."""
    found = [(int(m.group(1)), name) for name, _ in vit.named_parameters(recurse=False)
             if (m := _PART_TOKEN.match(name))]
    return [name for _, name in sorted(found)]


@contextlib.contextmanager
def _patch_dropout(vit: nn.Module, on: bool):
    """While `on` is False, the patch dropout `apply_patch_dropout` hooked onto the model (if any) passes tokens
    through: the masked view and the pooled features choose their tokens themselves."""
    drop = getattr(vit, "patch_dropout", None)
    if drop is None or on or not hasattr(drop, "enabled"):
        yield
        return
    drop.enabled = False
    try:
        yield
    finally:
        drop.enabled = True


def _model_grid(vit: nn.Module, num_positions: int) -> tuple[int, int]:
    """(ny, nx) the position embedding was made for: the patch embedding's (timm `grid_size`, TransReID / PASS
    `num_y`, `num_x`), CLIP-ReID's `h_resolution`, `w_resolution`, else a square of the positions."""
    pe = getattr(vit, "patch_embed", None)
    if getattr(pe, "grid_size", None) is not None:
        return tuple(int(g) for g in pe.grid_size)
    if getattr(pe, "num_y", None) is not None and getattr(pe, "num_x", None) is not None:
        return int(pe.num_y), int(pe.num_x)
    if getattr(vit, "h_resolution", None) is not None and getattr(vit, "w_resolution", None) is not None:
        return int(vit.h_resolution), int(vit.w_resolution)
    side = math.isqrt(num_positions)
    if side * side != num_positions:
        raise ValueError(f"{type(vit).__name__}: cannot tell the grid of its {num_positions} patch positions "
                         f"(no `patch_embed.grid_size`, `num_y`/`num_x` or `h_resolution`/`w_resolution`)")
    return side, side


def describe_vit(vit: nn.Module) -> ViTParts:
    """The `ViTParts` of a timm, amfor, TransReID-style (TransReID, PASS, HAP, ...) or CLIP visual ViT; a
    `ViTLayoutError` naming the class and its absent attributes for anything else."""
    if hasattr(vit, "embed") and hasattr(vit, "last_block") and hasattr(vit, "blocks"):  # amfor's ReIDViT
        return ViTParts("amfor", vit, vit.num_prefix_tokens, vit.embed_dim, tuple(vit.grid_size),
                        [*vit.blocks, vit.last_block], False, vit.norm, "pos_drop")
    if not _missing(vit, CLIP) and not hasattr(vit, "pos_embed"):
        pos = vit.positional_embedding
        num = (pos.shape[-2] if pos.dim() == 3 else pos.shape[0]) - 1
        return ViTParts("clip", vit, 1, vit.class_embedding.shape[-1], _model_grid(vit, num),
                        list(vit.transformer.resblocks), True, getattr(vit, "ln_post", nn.Identity()), "ln_pre")
    if _missing(vit, TOKEN_FIRST):
        raise layout_error(vit)
    timm = hasattr(vit, "_pos_embed") and hasattr(vit, "num_prefix_tokens")
    prefix = [getattr(vit, "cls_token", None), getattr(vit, "reg_token", None)]
    P = vit.num_prefix_tokens if timm else sum(t.shape[1] for t in prefix if t is not None)
    P += 0 if timm else len(_part_token_names(vit))
    family = "timm" if timm else "transreid"
    num = vit.pos_embed.shape[1] if vit.pos_embed is not None else 0
    grid = _model_grid(vit, num - P if _prefix_in_pos_embed(vit, family) else num)
    site = "patch_drop" if uses_timm_forward(vit) else ("pos_drop" if hasattr(vit, "pos_drop") else None)
    dim = vit.pos_embed.shape[-1] if vit.pos_embed is not None else vit.embed_dim
    return ViTParts(family, vit, P, dim, grid, list(vit.blocks), False,
                    getattr(vit, "norm", nn.Identity()), site)
