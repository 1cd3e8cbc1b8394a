"""The ViT patch grid: its geometry and everything cut along it (pixels, part masks, occlusion maps).

An image [H, W] cut into p x p patches every s pixels (s <= p: overlapping when s < p) gives the grid
ny x nx = ((H - p) // s + 1, (W - p) // s + 1) of N = ny * nx tokens in row-major order, as the backbone's patch
embedding (a stride-s convolution) flattens it. The models, the losses and the data all read the grid here.

- `grid_size`: (ny, nx) of an image size.
- `patchify`: pixels [B, C, H, W] -> [B, N, C p p] (the MAE reconstruction target, the parsing windows).
- `token_part_counts`, `mask_to_tokens`, `mask_to_token_fractions`: part masks [B, H, W] -> per-token label counts,
  majority labels or label shares.
- `patch_occlusion`: occlusion maps [B, H, W] -> which patches an occluder covers [B, ny, nx].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from amfor.utils.ranges import out_of_range

IGNORE = -1  # token label: no parsing mask (amfor.data NO_MASK) for its pixels


def grid_size(img_size: tuple[int, int], patch_size: int, stride: int, what: str = "image") -> tuple[int, int]:
    """(ny, nx) = ((H - p) // s + 1, (W - p) // s + 1) for img_size (H, W); needs 0 < s <= p <= min(H, W) (the
    error names `what` was cut)."""
    H, W = img_size
    if not 0 < stride <= patch_size <= min(H, W):
        raise ValueError(f"need 0 < stride <= patch_size <= min(H, W), got stride {stride}, patch_size "
                         f"{patch_size}, {what} {H}x{W}")
    return (H - patch_size) // stride + 1, (W - patch_size) // stride + 1


def patchify(imgs: torch.Tensor, patch_size: int, stride: int) -> torch.Tensor:
    """imgs [B, C, H, W] -> patches [B, N, C * p * p] on the ViT grid (ny = (H - p) // s + 1), row-major.

    Each patch vector is channel-major, as F.unfold (and a conv weight) lay it out: index c * p * p + i * p + j
    for channel c, row i, column j (MAE's own patchify puts the channel last). Overlapping strides (s < p)
    repeat pixels in neighbouring patches. Any dtype (the parsing targets cut integer masks with it): strided
    views and one copy, not F.unfold's im2col, which is float-only and slow on CPU for few channels.
    """
    if imgs.dim() != 4:
        raise ValueError(f"imgs must be [B, C, H, W], got {list(imgs.shape)}")
    grid_size(imgs.shape[-2:], patch_size, stride)
    B, C = imgs.shape[:2]
    windows = imgs.unfold(2, patch_size, stride).unfold(3, patch_size, stride)  # [B, C, ny, nx, p, p], a view
    return windows.permute(0, 2, 3, 1, 4, 5).reshape(B, -1, C * patch_size * patch_size)


def token_part_counts(mask: torch.Tensor, patch_size: int, stride: int, num_classes: int, *,
                      check: bool = True) -> torch.Tensor:
    """Pixels of each label in each token's p x p window: mask [B, H, W] (integer labels in [0, num_classes),
    -1 = no mask) -> counts [B, N, num_classes] (float32; -1 pixels are not counted). check=False skips the
    range check of the labels (a host sync): for masks the caller checked already.

    One index_add over the `patchify` windows, no [B, C, H, W] one-hot.
    """
    if mask.dim() != 3 or mask.is_floating_point():
        raise ValueError(f"mask must be an integer tensor [B, H, W], got {mask.dtype} {list(mask.shape)}")
    grid_size(mask.shape[-2:], patch_size, stride, "mask")
    bad = out_of_range(mask, IGNORE, num_classes) if check else None
    if bad:
        raise ValueError(f"mask values must lie in [0, {num_classes}) or be -1 (no mask), got [{bad[0]}, {bad[1]}]")
    windows = patchify(mask[:, None], patch_size, stride)  # [B, N, p*p] labels
    B, N, _ = windows.shape
    token = torch.arange(B * N, device=mask.device).view(B, N, 1)
    keys = token * num_classes + windows.clamp(min=0)
    valid = (windows >= 0).float()  # -1 pixels add 0 (a weight, not a boolean selection: no host sync)
    counts = torch.zeros(B * N * num_classes, device=mask.device).index_add_(0, keys.flatten(), valid.flatten())
    return counts.view(B, N, num_classes)


def mask_to_tokens(mask: torch.Tensor, patch_size: int, stride: int, num_classes: int, *,
                   check: bool = True) -> torch.Tensor:
    """Part label of each token (majority vote): mask [B, H, W] -> [B, N] (see `token_part_counts`).

    Each token gets the label with the largest area in its window (ties: the lower label, e.g. background); a
    token with no labelled pixel (every token of an image without a mask, which is -1 everywhere) is -1.
    Thin parts (arms, feet at 16x16 patches) rarely win a vote: `mask_to_token_fractions` keeps them.
    """
    counts = token_part_counts(mask, patch_size, stride, num_classes, check=check)
    return counts.argmax(-1).masked_fill(counts.sum(-1) == 0, IGNORE)  # argmax: the first maximum, lower label


def mask_to_token_fractions(mask: torch.Tensor, patch_size: int, stride: int, num_classes: int, *,
                            check: bool = True) -> torch.Tensor:
    """Share of each label in each token's window: mask [B, H, W] -> [B, N, num_classes] float32, rows summing
    to 1, or all 0 for a token with no labelled pixel (see `token_part_counts`)."""
    counts = token_part_counts(mask, patch_size, stride, num_classes, check=check)
    return counts / counts.sum(-1, keepdim=True).clamp(min=1)


def patch_occlusion(occ: torch.Tensor, patch: int = 16, stride: int | None = None, threshold: float = 0.5
                    ) -> torch.Tensor:
    """Per-patch occlusion [B, ny, nx] bool from a pixel map [B, H, W]: covered fraction >= threshold
    (threshold <= 0: any covered pixel). stride None: non-overlapping patches (stride = patch)."""
    stride = stride or patch
    frac = F.avg_pool2d(occ[:, None].float(), kernel_size=patch, stride=stride)[:, 0]
    return frac > 0 if threshold <= 0 else frac >= threshold - 1e-6
