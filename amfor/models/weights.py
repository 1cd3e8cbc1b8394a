"""Backbone weight loading: the checkpoint files AMFOR starts from, read into `ReIDViT` (docs/model.md, "Loading").

A file goes through four steps. `read_checkpoint`: a .safetensors file, a torch file (read with weights_only, an
`argparse.Namespace` allowed, as DINO / MAE / PASS save their `args`) or a TorchScript archive (OpenAI CLIP), and
its tensors found under the training wrappers (`model`, `state_dict`, `module`, DINO's `teacher`, MSN's
`target_encoder`, `student`). `to_vit_names`: wrapper prefixes stripped (`module.`, `backbone.`, `base.`, MoCo v3's
`base_encoder.`, `encoder.`) and two layouts converted to timm's ViT names: the CLIP visual tower (OpenAI's
`visual.*`, CLIP-ReID's `image_encoder.*`) and PASS's split position embedding (`cls_pos` + `pos_embed`).
`filter_checkpoint`: block `depth` (and TransReID's `b1` branch) to `last_block` / `norm`, the position embedding
resampled from the checkpoint's grid and the patch kernel from its patch size, the width and depth checked.
`load_pretrained`: load and report what was missing, unused, resampled and dropped.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed

if TYPE_CHECKING:
    from amfor.models.backbone import ReIDViT

_logger = logging.getLogger("amfor.models.backbone")  # the loading log has always been the backbone's

STRIP_PREFIXES = ("module.", "backbone.", "base_encoder.", "base.", "encoder.")  # DDP, DINO, MoCo v3, TransReID
WRAPPERS = ("model", "state_dict", "module", "teacher", "target_encoder", "student")  # first found wins, per level
OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")  # integer entries of OpenAI's CLIP archives
CLIP_BLOCK_NAMES = (("ln_1.", "norm1."), ("ln_2.", "norm2."), ("attn.in_proj_", "attn.qkv."),
                    ("attn.out_proj.", "attn.proj."), ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."))


@dataclass
class LoadReport:
    """What loading a checkpoint did: backbone keys not loaded, checkpoint keys not used, tensors resampled."""

    missing: list[str] = field(default_factory=list)  # model keys the checkpoint did not provide
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys (prefixes stripped) not used
    resampled: list[str] = field(default_factory=list)  # "key: old -> new" for resampled tensors
    dropped: list[str] = field(default_factory=list)  # "key (reason)" for matching keys that could not be used
    layout: str = "vit"  # "vit" (timm names), "clip" (CLIP visual tower) or "pass" (PASS's part tokens)
    wrappers: list[str] = field(default_factory=list)  # the dict keys the tensors sat under, outermost first
    notes: list[str] = field(default_factory=list)  # where the loaded backbone computes unlike the checkpoint's

    def __str__(self) -> str:
        parts = [f"{len(self.missing)} missing", f"{len(self.unexpected)} unexpected"]
        for name in ("missing", "unexpected", "resampled", "dropped"):
            keys = getattr(self, name)
            if keys:
                parts.append(f"{name}: {', '.join(_summarise(keys))}")
        parts.append(f"layout {self.layout}" + (f" under {' > '.join(self.wrappers)}" if self.wrappers else ""))
        return "; ".join(parts + self.notes)


def _summarise(keys: list[str], limit: int = 12) -> list[str]:
    """Keys grouped by module prefix (`blocks.3.*`) so that a report stays readable."""
    groups: dict[str, int] = {}
    for k in keys:
        head = ".".join(k.split(".")[:2]) if k.startswith("blocks.") else k.split(".")[0]
        groups[head] = groups.get(head, 0) + 1
    out = [f"{h}.*" if n > 1 or h not in keys else h for h, n in groups.items()]
    return out if len(out) <= limit else out[:limit] + [f"... ({len(out) - limit} more)"]


# ---- reading a file ----

def is_torchscript(path: str | Path) -> bool:
    """Whether the file is a TorchScript archive (a zip holding `constants.pkl`, as OpenAI's CLIP files are)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in archive.namelist())


def torchscript_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a TorchScript archive, read as open_clip's `load_openai_model` does (`torch.jit.load` then
    `.state_dict()`), without OpenAI's integer entries (input_resolution, context_length, vocab_size)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated; OpenAI ships only these
        module = torch.jit.load(str(path), map_location="cpu")
    return {k: v for k, v in module.state_dict().items() if k not in OPENAI_EXTRAS}


def _read_file(path: Path) -> object:
    """The object a checkpoint file holds (never touches the network); any failure is a ValueError naming it."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        if is_torchscript(path):
            return torchscript_state_dict(path)
        with torch.serialization.safe_globals([argparse.Namespace]):  # DINO / MAE / PASS keep their `args`
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling, safetensors header, zip errors: all mean "not a checkpoint"
        raise ValueError(f"{path} is not a readable checkpoint ({type(err).__name__}: {str(err)[:200]})") from err


def unwrap(obj: object) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(tensors, wrappers): descend through the training wrappers (`WRAPPERS`, the first present at each level,
    so DINO's `teacher` before its `student`), then keep the string-keyed tensors."""
    wrappers = []
    while isinstance(obj, dict):
        key = next((k for k in WRAPPERS if isinstance(obj.get(k), dict)), None)
        if key is None:
            break
        wrappers.append(key)
        obj = obj[key]
    if not isinstance(obj, dict):
        return {}, wrappers
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}, wrappers


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(tensors, wrappers) of a checkpoint file: .safetensors, a torch file (.pth/.pt/.bin) or a TorchScript archive.

    Raises FileNotFoundError for a missing file and ValueError, naming the file, for an unreadable one or one
    without tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    obj = _read_file(path)
    tensors, wrappers = unwrap(obj)
    if not tensors:
        raise ValueError(f"{path} holds no state dict of tensors (found {type(obj).__name__}"
                         + (f" with keys {list(obj)[:8]}" if isinstance(obj, dict) else "") + ")")
    return tensors, wrappers


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file (see `read_checkpoint`), wrappers removed, keys as stored."""
    return read_checkpoint(path)[0]


# ---- checkpoint names -> timm ViT names ----

def strip_prefixes(key: str, prefixes: tuple[str, ...] = STRIP_PREFIXES) -> str:
    """`module.base.blocks.0.x` -> `blocks.0.x`: drop wrapper prefixes from the front, repeatedly."""
    while True:
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            return key
        key = key[len(prefix):]


def clip_visual_prefix(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The prefix of a CLIP visual tower (`visual.`, `image_encoder.`, `module.image_encoder.`, ...), or None."""
    for key in state_dict:
        if key.endswith("class_embedding"):
            prefix = key[: -len("class_embedding")]
            if f"{prefix}conv1.weight" in state_dict and f"{prefix}transformer.resblocks.0.ln_1.weight" in state_dict:
                return prefix
    return None


def _clip_name(key: str) -> str | None:
    """CLIP visual name (prefix removed) -> timm ViT name; None for the tensors ReIDViT has no place for."""
    simple = {"conv1.weight": "patch_embed.proj.weight", "class_embedding": "cls_token",
              "positional_embedding": "pos_embed", "ln_post.weight": "norm.weight", "ln_post.bias": "norm.bias"}
    if key in simple:
        return simple[key]
    match = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", key)
    if match is None:
        return None
    for old, new in CLIP_BLOCK_NAMES:
        if match[2].startswith(old):
            return f"blocks.{match[1]}.{new}{match[2][len(old):]}"
    return None


def _from_clip(state_dict: dict[str, torch.Tensor], prefix: str, report: LoadReport) -> dict[str, torch.Tensor]:
    """OpenAI CLIP / CLIP-ReID visual tower -> timm ViT names; the rest of the file (text tower, heads) unused."""
    out = {}
    for key, value in state_dict.items():
        rel = key[len(prefix):] if key.startswith(prefix) else ""
        name = _clip_name(rel) if rel else None
        short = strip_prefixes(key, ("module.",))
        if name is not None:
            out[name] = value.reshape(1, 1, -1) if name == "cls_token" else value
        elif rel.startswith("ln_pre."):
            report.dropped.append(f"{short} (ReIDViT has no pre-norm before its blocks)")
        elif short == "cv_embed":
            report.dropped.append("cv_embed (CLIP-ReID's camera embedding, added to the CLS token only)")
        else:
            report.unexpected.append(short)
    weight = out.get("patch_embed.proj.weight")
    if weight is not None and "patch_embed.proj.bias" not in out:
        out["patch_embed.proj.bias"] = weight.new_zeros(weight.shape[0])  # CLIP's conv1 has no bias
        report.notes.append("patch_embed.proj.bias set to 0 (CLIP's conv1 has none)")
    report.notes.append("CLIP's tower runs a pre-norm (ln_pre) and OpenAI's QuickGELU, ReIDViT neither: its "
                        "features differ until fine-tuned")
    return out


def _from_pass(state_dict: dict[str, torch.Tensor], report: LoadReport) -> dict[str, torch.Tensor]:
    """PASS: `pos_embed` holds the patch positions only and `cls_pos` the CLS one; join them (part tokens unused)."""
    out = dict(state_dict)
    out["pos_embed"] = torch.cat([out.pop("cls_pos").reshape(1, 1, -1), out["pos_embed"].reshape(
        1, -1, out["pos_embed"].shape[-1])], dim=1)
    report.notes.append("PASS: cls_pos joined to pos_embed; its three part tokens are not used")
    return out


def to_vit_names(state_dict: dict[str, torch.Tensor], report: LoadReport) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors under timm's ViT names (sets `report.layout`, notes what cannot be used).

    Raises ValueError for a convolutional patch stem (TransReID-SSL / PASS "ICS" models), which ReIDViT lacks.
    """
    prefix = clip_visual_prefix(state_dict)
    if prefix is not None:
        report.layout = "clip"
        return _from_clip(state_dict, prefix, report)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        stripped = strip_prefixes(key)
        if stripped in out:  # e.g. MoCo v3's `base_encoder.` vs a plain copy: keep the first, report the other
            report.unexpected.append(key)
            continue
        out[stripped] = value
    stem = sorted(k for k in out if k.startswith("patch_embed.conv."))
    if stem:
        raise ValueError(f"the patch embedding has a convolutional stem ({stem[0]}, ...: an 'ICS' model of "
                         "TransReID-SSL or PASS), which ReIDViT does not have: use the checkpoint without ICS")
    if "cls_pos" in out and "pos_embed" in out:
        report.layout = "pass"
        out = _from_pass(out, report)
    if "norm_pre.weight" in out:  # timm's CLIP ViTs
        report.dropped.append("norm_pre (ReIDViT has no pre-norm before its blocks)")
        out = {k: v for k, v in out.items() if not k.startswith("norm_pre.")}
    return out


# ---- timm ViT names -> ReIDViT ----

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


def _check_architecture(state_dict: dict[str, torch.Tensor], model: ReIDViT) -> None:
    """Raise when the checkpoint's ViT has another width or depth than the backbone (its blocks would not fit)."""
    probe = next((state_dict[k] for k in ("cls_token", "pos_embed", "blocks.0.norm1.weight") if k in state_dict), None)
    if probe is not None and probe.shape[-1] != model.embed_dim:
        raise ValueError(f"the checkpoint is a ViT of width {probe.shape[-1]}, the backbone's width is "
                         f"{model.embed_dim}: build the variant of the checkpoint's width")
    blocks = {int(m[1]) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = max(blocks) + 1 + any(k.startswith("last_block.") for k in state_dict) if blocks else model.depth
    if depth != model.depth:  # a ReIDViT (AMFOR) state dict keeps its last block apart, as `last_block`
        raise ValueError(f"the checkpoint has {depth} blocks, the backbone {model.depth}: build the variant of the "
                         "checkpoint's depth")


def filter_checkpoint(state_dict: dict[str, torch.Tensor], model: ReIDViT, old_grid: tuple[int, int] | None = None,
                      report: LoadReport | None = None) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """`checkpoint_filter_fn` with its report (`missing` is left for load_state_dict to fill)."""
    report = report if report is not None else LoadReport()
    vit = to_vit_names(state_dict, report)
    _check_architecture(vit, model)
    ours = model.state_dict()
    renamed: dict[str, tuple[str, torch.Tensor]] = {}
    # TransReID's b1 branch (the trained copy of the last block and norm) wins over base.blocks.{depth-1} / norm
    for key in sorted(vit, key=lambda k: k.startswith("b1.")):
        new = _rename(key, model.depth)
        if new in renamed:
            report.unexpected.append(renamed[new][0])
        renamed[new] = (key, vit[key])
    out = {}
    for new, (key, value) in renamed.items():
        if new not in ours:
            report.unexpected.append(key)
            continue
        if value.is_floating_point():
            value = value.to(ours[new].dtype)  # OpenAI's fp16 weights; resampling wants the model's dtype
        value = _adapt(new, value, model, old_grid, report)
        if value is None:
            continue
        if value.shape != ours[new].shape:
            raise ValueError(f"checkpoint tensor {key} has shape {list(value.shape)}, the backbone's {new} "
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

    Converts the names (`to_vit_names`: wrapper prefixes, CLIP visual towers, PASS), maps `blocks.{depth-1}.*`
    (and TransReID's `b1.0.*`, `b1.1.*`) to `last_block.*` / `norm.*`, keeps only the backbone's keys (heads,
    classifiers, decoders, mask tokens are left out), resamples `pos_embed` from the checkpoint's grid (`old_grid`,
    or inferred by `infer_grid`) and `patch_embed.proj.weight` from its patch size, and leaves out a `sie_embed`
    with another camera count. `filter_checkpoint` also returns what it did.
    """
    return filter_checkpoint(state_dict, model, old_grid)[0]


def load_pretrained(model: ReIDViT, path: str | Path, strict: bool = False,
                    old_grid: tuple[int, int] | None = None) -> LoadReport:
    """Load a checkpoint file into the backbone (see the module docstring for the formats); returns the report.

    strict: raise if any backbone weight is missing (unexpected checkpoint keys are always allowed and reported).
    Every error names the file: missing (FileNotFoundError), unreadable, no ViT weights, another width or depth,
    a convolutional patch stem (ValueError).
    """
    state_dict, wrappers = read_checkpoint(path)
    report = LoadReport(wrappers=wrappers)
    try:
        filtered, report = filter_checkpoint(state_dict, model, old_grid, report)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    if not filtered:
        raise ValueError(f"{path}: no backbone weight found among its {len(state_dict)} tensors "
                         f"(first keys: {list(state_dict)[:5]})")
    result = model.load_state_dict(filtered, strict=False)
    report.missing = sorted(result.missing_keys)
    if strict and report.missing:
        raise ValueError(f"{path}: backbone weights missing from the checkpoint: {report.missing}")
    warn = report.missing or report.dropped or report.layout == "clip"
    _logger.log(logging.WARNING if warn else logging.INFO, "loaded %s: %s", path, report)
    return report
