"""Validation of what callers hand the models: images, identity labels, camera ids, masks (one module, one place).

The models check their inputs once, at their entry (`AMFOR.forward*`, `ReIDViT.forward*`), before anything else
runs, so that bad input is reported as what it is; the components they call never re-check indices the model
made or checked itself. Shape and dtype checks read no tensor; the value ranges of pids and camids are checked
together with a single host synchronisation (`check_ranges`), skipped while tracing (export, compile).

Camera ids: 0-based integers below `num_cameras`, or -1 for an image whose camera is unknown; `camids=None` means
every camera of the batch is unknown (docs/model.md, "Cameras").
"""

from __future__ import annotations

import torch

from amfor.utils.ranges import out_of_range

UNKNOWN_CAMERA = -1


def tracing() -> bool:
    """Whether the forward is being traced (torch.compile, torch.export, ONNX export, jit.trace)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def check_images(images, in_chans: int, size: tuple[int, int]) -> None:
    """images must be a floating tensor [B, in_chans, H, W] at the model's (H, W)."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a tensor [B, {in_chans}, {size[0]}, {size[1]}], got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != in_chans or tuple(images.shape[-2:]) != tuple(size):
        raise ValueError(f"image must be [B, {in_chans}, {size[0]}, {size[1]}] (the model's img_size), got "
                         f"{list(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point (normalised pixels), got {images.dtype}")


def check_ids(ids, batch: int, name: str = "pids") -> None:
    """ids must be an integer tensor of shape [batch] (shape and dtype only: no value is read)."""
    if not isinstance(ids, torch.Tensor) or ids.shape != (batch,) or ids.is_floating_point() or ids.is_complex() \
            or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of shape [{batch}], got "
                         f"{getattr(ids, 'dtype', type(ids).__name__)} {list(getattr(ids, 'shape', []))}")


def check_maps(batch: int, size: tuple[int, int], **maps: torch.Tensor | None) -> None:
    """Pixel maps (part masks, occlusion) must be [B, H, W] when given."""
    H, W = size
    for name, t in maps.items():
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (batch, H, W)):
            raise ValueError(f"{name} must be [B, H, W] = [{batch}, {H}, {W}], got "
                             f"{list(getattr(t, 'shape', [])) or type(t).__name__}")


def check_ranges(pids: torch.Tensor | None, num_classes: int, camids: torch.Tensor | None, num_cameras: int,
                 masks: torch.Tensor | None = None, num_labels: int = 0) -> None:
    """pids in [0, num_classes), camids in [-1, num_cameras) (-1: unknown camera) and part masks in
    [-1, num_labels) (-1: no mask), with one host sync for all of them.

    camids are not checked when `num_cameras` is 0 (a model without cameras ignores them). Nothing is read while
    tracing. Raises ValueError naming the offending tensor and its range.
    """
    if tracing():
        return
    checks = []
    if pids is not None and pids.numel():
        checks.append(("pids", pids, 0, num_classes))
    if camids is not None and num_cameras > 0 and camids.numel():
        checks.append(("camids", camids, UNKNOWN_CAMERA, num_cameras))
    if masks is not None and masks.numel():
        checks.append(("masks", masks, -1, num_labels))
    if not checks:
        return
    flags = torch.stack([((t < lo) | (t >= hi)).any() for _, t, lo, hi in checks])
    if not bool(flags.any()):  # the one host sync of a valid batch
        return
    for name, t, lo, hi in checks:
        bad = out_of_range(t, lo, hi)
        if bad is None:
            continue
        if name == "pids":
            raise ValueError(f"pids must lie in [0, num_classes = {hi}), got values in [{bad[0]}, {bad[1]}]")
        if name == "masks":
            raise ValueError(f"mask values must lie in [0, {hi}) (background and the part labels) or be -1 (no mask), "
                             f"got values in [{bad[0]}, {bad[1]}]")
        raise ValueError(f"camids must lie in [0, {hi}) (the model's num_cameras), or be -1 for an unknown camera, "
                         f"got values in [{bad[0]}, {bad[1]}]")
