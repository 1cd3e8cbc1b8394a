"""Model registry, as timm's `@register_model`: `create_model(name, num_classes, ...)`, `list_models()`.

Each variant's `pretrained_cfg` (timm's dict: input size, mean, std, interpolation, ...) is defined here, once, and
set on the model; the data transforms, extraction and export read it from there (`amfor.data.resolve_data_config`).

Variants (docs/spec.md "Shapes"; parameter counts in docs/model.md):
- `amfor_vit_base_patch16`: the paper's configuration: ViT-B/16 at 256x128 (stride 16; `stride=11` for the
  Occluded-Duke setting), six fusion points, the CLIP ViT-B/16 text tower's shape.
- `amfor_vit_small_patch16`: ViT-S/16 (width 384, 12 blocks, 6 heads) with a 6-layer, width-256 text tower.
- `amfor_vit_tiny_patch16`: for CPU: 128x64 input, width 192, 6 blocks, a 2-layer width-128 text tower and
  small decoders, sized for the default synthetic demo on a laptop CPU; trained from scratch there, with camera
  centring on (docs/model.md, "Cameras") and the HPR masked view on a quarter of the batch (`hpr_fraction=0.25`,
  docs/model.md "HPR-Decoder, patch level") and the part-level reconstruction read from detached features and used
  at test time (`recon_detach=True`, `recon_fill=True`: docs/model.md "HPR-Decoder, part level"), all chosen on
  the validation split.
"""

from __future__ import annotations

from collections.abc import Callable

from amfor.models.amfor import AMFOR
from amfor.schema import REID_MEAN, REID_STD

_MODELS: dict[str, Callable[..., AMFOR]] = {}


def register_model(fn: Callable[..., AMFOR]) -> Callable[..., AMFOR]:
    """Register a factory `fn(num_classes, num_cameras=0, **overrides) -> AMFOR` under its function name."""
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def pretrained_cfg(**overrides) -> dict:
    """timm's `pretrained_cfg` of an AMFOR variant: the preprocessing its weights expect (TransReID's and
    CLIP-ReID's: pixels scaled to [0, 1], then mean = std = 0.5 per channel, bilinear resize to the full input
    size) and the names timm's tools look for. `input_size` is (3, H, W); the model overwrites it with its own."""
    return {"url": "", "hf_hub_id": None, "num_classes": 0, "input_size": (3, 256, 128), "pool_size": None,
            "crop_pct": 1.0, "crop_mode": "center", "interpolation": "bilinear", "fixed_input_size": True,
            "mean": REID_MEAN, "std": REID_STD, "first_conv": "backbone.patch_embed.proj",
            "classifier": "global_neck.classifier", "license": "", **overrides}


def create_model(name: str, num_classes: int = 0, num_cameras: int = 0, pretrained: str | None = None,
                 **overrides) -> AMFOR:
    """Build a registered variant; `num_classes=0`: a headless feature extractor (timm's convention);
    `pretrained`: a local backbone checkpoint (timm / TransReID / HAP) to load; `overrides`: any AMFOR keyword
    (switches such as `hpr=False`, sizes, loss weights)."""
    if name not in _MODELS:
        import difflib

        close = difflib.get_close_matches(name, _MODELS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}; available: {list_models()}")
    model = _MODELS[name](num_classes, num_cameras, **overrides)
    if pretrained:
        model.load_pretrained(pretrained)
    return model


def _build(cfg: dict, defaults: dict, num_classes: int, num_cameras: int, overrides: dict) -> AMFOR:
    """The variant with its `pretrained_cfg`; its input size is the default `img_size`."""
    defaults = {"img_size": tuple(cfg["input_size"][1:]), **defaults, "pretrained_cfg": cfg}
    return AMFOR(num_classes, num_cameras, **{**defaults, **overrides})


@register_model
def amfor_vit_base_patch16(num_classes: int, num_cameras: int = 0, **overrides) -> AMFOR:
    defaults = dict(patch_size=16, stride=16, embed_dim=768, depth=12, num_heads=12,
                    text_width=512, text_heads=8, text_layers=12, text_dim=512, fusion_points=(1, 2, 4, 6, 8, 10),
                    part_heads=8, part_ffn_dim=3072, hpr_dim=512, hpr_depth=2, hpr_heads=8, recon_dim=512,
                    recon_depth=3, recon_heads=8)
    return _build(pretrained_cfg(input_size=(3, 256, 128)), defaults, num_classes, num_cameras, overrides)


@register_model
def amfor_vit_small_patch16(num_classes: int, num_cameras: int = 0, **overrides) -> AMFOR:
    defaults = dict(patch_size=16, stride=16, embed_dim=384, depth=12, num_heads=6,
                    text_width=256, text_heads=4, text_layers=6, text_dim=256, fusion_points=(1, 2, 4, 6, 8, 10),
                    part_heads=6, part_ffn_dim=1536, hpr_dim=256, hpr_depth=1, hpr_heads=8, recon_dim=256,
                    recon_depth=2, recon_heads=8)
    return _build(pretrained_cfg(input_size=(3, 256, 128)), defaults, num_classes, num_cameras, overrides)


@register_model
def amfor_vit_tiny_patch16(num_classes: int, num_cameras: int = 0, **overrides) -> AMFOR:
    defaults = dict(patch_size=16, stride=16, embed_dim=192, depth=6, num_heads=3,
                    drop_path_rate=0.05, camera_centering=num_cameras > 0, text_width=128, text_heads=2, text_layers=2,
                    text_dim=128,
                    fusion_points=(1, 2, 4), part_heads=4, part_ffn_dim=768, hpr_dim=128, hpr_depth=1, hpr_heads=4,
                    hpr_fraction=0.25, recon_dim=128, recon_depth=1, recon_heads=4, recon_detach=True,
                    recon_fill=bool(overrides.get("part_recon", True)))  # rebuilt parts at test time, where built
    return _build(pretrained_cfg(input_size=(3, 128, 64)), defaults, num_classes, num_cameras, overrides)
