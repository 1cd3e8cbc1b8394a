"""TransReID-style ViT backbone of AMFOR (SPEC-AMFOR.md section 1), made of timm's parts, and its weight loading.

Overlapping patch embedding (a timm `PatchEmbed` whose conv has stride s <= p), a learned position embedding
on the ny x nx grid (ny = (H - p) // s + 1), side information embedding (one learned vector per camera, scaled
by `sie_coef`) added to all tokens, timm `Block`s 1..depth-1 producing the shared memory M, and a separate
copy of block `depth` plus the final LayerNorm producing the global branch G (g = G[:, 0]).

Weights load from timm ViT checkpoints and TransReID / HAP / DDP-style state dicts (`load_state_dict_file`,
`checkpoint_filter_fn`, `ReIDViT.load_pretrained`): prefixes are stripped, block `depth` goes to `last_block`,
the position embedding is resampled from the checkpoint's grid and the patch kernel from its patch size.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.layers import (
    LayerNorm,
    PatchEmbed,
    calculate_drop_path_rates,
    resample_abs_pos_embed,
    resample_patch_embed,
    trunc_normal_,
)
from timm.models.vision_transformer import Block, init_weights_vit_timm
from torch import nn

from amfor.models.inputs import check_ids, check_images, check_ranges, tracing  # noqa: F401

_logger = logging.getLogger(__name__)

STRIP_PREFIXES = ("module.", "backbone.", "base.", "encoder.")  # DDP, ReID wrappers, TransReID, I-JEPA/MAE
CLIP_MARKERS = ("transformer.resblocks.", "class_embedding", "positional_embedding")


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
        self.grid_size = tuple((s - patch_size) // stride + 1 for s in self.img_size)
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

    def embed(self, x: torch.Tensor, camids: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens x_0 [B, 1 + N, D] = cat(CLS, patches) + pos_embed (+ camera embedding), after pos_drop."""
        x = self.patch_tokens(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        sie = self.camera_embedding(camids, x.shape[0])
        if sie is not None:
            x = x + sie
        return self.pos_drop(x)

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
        """Load a timm / TransReID / HAP checkpoint file (see `checkpoint_filter_fn`); returns the report.

        strict: raise if any backbone weight is missing (unexpected checkpoint keys are always allowed and
        reported). A checkpoint sharing no weight with the backbone is an error either way.
        """
        state_dict = load_state_dict_file(path)
        try:
            filtered, report = filter_checkpoint(state_dict, self, old_grid)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        result = self.load_state_dict(filtered, strict=False)
        report.missing = sorted(result.missing_keys)
        if not filtered:
            raise ValueError(f"{path}: no backbone weight found among its {len(state_dict)} tensors "
                             f"(first keys: {list(state_dict)[:5]})")
        if strict and report.missing:
            raise ValueError(f"{path}: backbone weights missing from the checkpoint: {report.missing}")
        _logger.log(logging.WARNING if report.missing else logging.INFO, "loaded %s: %s", path, report)
        return report


@dataclass
class LoadReport:
    """What loading a checkpoint did: backbone keys not loaded, checkpoint keys not used, tensors resampled."""

    missing: list[str] = field(default_factory=list)  # model keys the checkpoint did not provide
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys (prefixes stripped) not used
    resampled: list[str] = field(default_factory=list)  # "key: old -> new" for resampled tensors
    dropped: list[str] = field(default_factory=list)  # "key (reason)" for matching keys that could not be used

    def __str__(self) -> str:
        parts = [f"{len(self.missing)} missing", f"{len(self.unexpected)} unexpected"]
        for name in ("missing", "unexpected", "resampled", "dropped"):
            keys = getattr(self, name)
            if keys:
                parts.append(f"{name}: {', '.join(_summarise(keys))}")
        return "; ".join(parts)


def _summarise(keys: list[str], limit: int = 12) -> list[str]:
    """Keys grouped by module prefix (`blocks.3.*`) so that a report stays readable."""
    groups: dict[str, int] = {}
    for k in keys:
        head = ".".join(k.split(".")[:2]) if k.startswith("blocks.") else k.split(".")[0]
        groups[head] = groups.get(head, 0) + 1
    out = [f"{h}.*" if n > 1 or h not in keys else h for h, n in groups.items()]
    return out if len(out) <= limit else out[:limit] + [f"... ({len(out) - limit} more)"]


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file: .safetensors, or a torch file (.pth/.pt/.bin) read with weights_only.

    Unwraps {"model": ...}, {"state_dict": ...} and {"module": ...}; never touches the network.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling, safetensors header, zip errors: all mean "not a checkpoint"
        raise ValueError(f"{path} is not a readable checkpoint ({type(err).__name__}: {str(err)[:200]})") from err
    while isinstance(obj, dict):
        inner = next((obj[k] for k in ("model", "state_dict", "module") if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)} if isinstance(
        obj, dict) else {}
    if not tensors:
        raise ValueError(f"{path} holds no state dict of tensors (found {type(obj).__name__})")
    return tensors


def strip_prefixes(key: str, prefixes: tuple[str, ...] = STRIP_PREFIXES) -> str:
    """`module.base.blocks.0.x` -> `blocks.0.x`: drop wrapper prefixes from the front, repeatedly."""
    while True:
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            return key
        key = key[len(prefix):]


def infer_grid(num_tokens: int, target: tuple[int, int]) -> tuple[int, int]:
    """The checkpoint's grid from its patch-token count: square when it is a square, else the factorisation
    h x w whose aspect ratio h / w is closest (in log) to the target grid's."""
    side = math.isqrt(num_tokens)
    if side * side == num_tokens:
        return side, side
    aim = math.log(target[0] / target[1])
    pairs = [(h, num_tokens // h) for h in range(1, num_tokens + 1) if num_tokens % h == 0]
    return min(pairs, key=lambda hw: abs(math.log(hw[0] / hw[1]) - aim))


def _rename(key: str, depth: int) -> str:
    """Checkpoint key (prefixes stripped) -> our key: block `depth` and TransReID's b1 branch to last_block/norm."""
    last = f"blocks.{depth - 1}."
    if key.startswith(last):
        return "last_block." + key[len(last):]
    if key.startswith("b1.0."):
        return "last_block." + key[len("b1.0."):]
    if key.startswith("b1.1."):
        return "norm." + key[len("b1.1."):]
    return key


def filter_checkpoint(state_dict: dict[str, torch.Tensor], model: ReIDViT,
                      old_grid: tuple[int, int] | None = None) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """`checkpoint_filter_fn` with its report (`missing` is left for load_state_dict to fill)."""
    if any(m in k for k in state_dict for m in CLIP_MARKERS):
        raise ValueError("OpenAI-CLIP visual weights (transformer.resblocks.*) are not supported: their ViT has a "
                         "pre-norm (ln_pre) and QuickGELU, which ReIDViT does not")
    ours = model.state_dict()
    report = LoadReport()
    renamed: dict[str, tuple[str, torch.Tensor]] = {}
    # TransReID's b1 branch (the trained copy of the last block and norm) wins over base.blocks.{depth-1} / norm
    for key in sorted(state_dict, key=lambda k: strip_prefixes(k).startswith("b1.")):
        stripped = strip_prefixes(key)
        new = _rename(stripped, model.depth)
        if new in renamed:
            report.unexpected.append(renamed[new][0])
        renamed[new] = (stripped, state_dict[key])
    out = {}
    for new, (stripped, value) in renamed.items():
        if new not in ours:
            report.unexpected.append(stripped)
            continue
        value = _adapt(new, value, model, old_grid, report)
        if value is None:
            continue
        if value.shape != ours[new].shape:
            raise ValueError(f"checkpoint tensor {stripped} has shape {list(value.shape)}, the backbone's {new} "
                             f"has {list(ours[new].shape)} (a different architecture?)")
        out[new] = value
    report.unexpected.sort()
    return out, report


def _adapt(key: str, value: torch.Tensor, model: ReIDViT, old_grid: tuple[int, int] | None,
           report: LoadReport) -> torch.Tensor | None:
    """Resample pos_embed / patch kernel to the model; None (and a note) for a camera embedding of another size."""
    if key == "pos_embed":
        value = value[None] if value.dim() == 2 else value
        grid = tuple(old_grid) if old_grid is not None else infer_grid(value.shape[1] - 1, model.grid_size)
        if grid[0] * grid[1] != value.shape[1] - 1:
            raise ValueError(f"old_grid {grid} does not match the checkpoint's {value.shape[1] - 1} patch positions")
        if grid != model.grid_size:
            value = resample_abs_pos_embed(value, list(model.grid_size), list(grid), num_prefix_tokens=1)
            report.resampled.append(f"pos_embed: {grid[0]}x{grid[1]} -> {model.grid_size[0]}x{model.grid_size[1]}")
    elif key == "patch_embed.proj.weight" and value.dim() == 4 and value.shape[-1] != model.patch_size:
        old = tuple(value.shape[-2:])
        value = resample_patch_embed(value, [model.patch_size, model.patch_size])
        report.resampled.append(f"patch_embed.proj.weight: {old[0]}x{old[1]} -> {model.patch_size}x{model.patch_size}")
    elif key == "sie_embed" and value.shape[0] != model.num_cameras:
        report.dropped.append(f"sie_embed (checkpoint has {value.shape[0]} cameras, the model {model.num_cameras})")
        return None
    return value


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: ReIDViT,
                         old_grid: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict as ReIDViT keys and shapes, ready for `model.load_state_dict`.

    Strips `module.` / `backbone.` / `base.` / `encoder.` prefixes, maps `blocks.{depth-1}.*` (and TransReID's
    `b1.0.*`, `b1.1.*`) to `last_block.*` / `norm.*`, keeps only the backbone's keys (heads, classifiers,
    decoders, mask tokens are left out), resamples `pos_embed` from the checkpoint's grid (`old_grid`, or
    inferred by `infer_grid`) and `patch_embed.proj.weight` from its patch size, and leaves out a `sie_embed`
    with another camera count. `filter_checkpoint` also returns what it did.
    """
    return filter_checkpoint(state_dict, model, old_grid)[0]
