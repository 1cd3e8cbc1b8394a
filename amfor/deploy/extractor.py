"""`amfor.Extractor`: ReID features of images, crops of a frame or tensors, from a checkpoint, weights file or model.

    extractor = amfor.Extractor("best.safetensors")             # or a checkpoint .pt, or a model in eval mode
    feats = extractor(["a.jpg", "b.jpg"])                        # [N, D] float32, L2-normalised, on the CPU
    result = extractor(images, camids=[0, 3], parts=True)        # a FeatureSet: parts [N, 1+P, D], visibility
    feats = extractor.from_frame(frame_bgr, boxes_xyxy)          # crops of an OpenCV frame, as trackers ask

Preprocessing is the evaluation's own: the test transform of the data pipeline (`ReIDTransform(train=False)` with
`resolve_data_config(model)`: the model's size, mean, std and interpolation), and paths are read as the test
loader reads them, so a folder's features equal those `amfor.evaluation.protocol.extract` computes.
Inputs: image paths, PIL images, uint8 [H, W, 3] arrays (RGB, or BGR with bgr=True as OpenCV gives them), uint8
tensors [3, H, W] or [B, 3, H, W] (resized and normalised here), or a float tensor [B, 3, H, W] at the model's size
already normalised (bgr=True applies to arrays and uint8 tensors; files and PIL images are RGB). camids: None (every
camera unknown, as `model(images)`) or one id per image, -1 unknown; an id beyond the model's cameras is unknown.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data import ReIDTransform, resolve_data_config
from ..utils.distributed import resolve_device
from .feature_file import FeatureSet

ImageInput = str | Path | Image.Image | np.ndarray | torch.Tensor


def test_transform(model: nn.Module) -> ReIDTransform:
    """The evaluation's transform for `model`: resize to its input size and normalise as its config says."""
    cfg = resolve_data_config(model)
    return ReIDTransform(cfg["size"], train=False, mean=cfg["mean"], std=cfg["std"], interpolation=cfg["interpolation"])


def read_image(path: str | Path) -> Image.Image:
    """An image file as RGB, as the test loader reads it; OSError naming the file when it cannot be read."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
        raise OSError(f"cannot read image {path}: {exc}") from exc


def as_image(item: ImageInput, bgr: bool = False, index: int = 0):
    """One input as what `ReIDTransform` takes: a PIL image (RGB), an [H, W, 3] uint8 array or a [3, H, W] uint8
    tensor, channels in RGB order. ValueError naming the input's position when it is none of the kinds."""
    if isinstance(item, (str, Path)):
        return read_image(item)
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim != 3 or item.shape[2] != 3:
            raise ValueError(f"input {index}: an image array must be uint8 [H, W, 3], got {item.dtype} "
                             f"{list(item.shape)}")
        return np.array(item[..., ::-1] if bgr else item)  # an own, writable copy (PIL's arrays are read-only)
    if isinstance(item, torch.Tensor):
        if item.dtype != torch.uint8 or item.dim() != 3 or item.shape[0] != 3:
            raise ValueError(f"input {index}: an image tensor must be uint8 [3, H, W] (or a batch [B, 3, H, W]), got "
                             f"{item.dtype} {list(item.shape)}")
        return item.flip(0) if bgr else item
    raise ValueError(f"input {index}: expected an image path, a PIL image, a uint8 array or tensor, got "
                     f"{type(item).__name__}")


class _Inputs(Dataset):
    """items[i] -> {"img": [3, H, W] float, "index": i}; with `skip_bad`, an unreadable file gives {"index": i,
    "error": message} instead of raising."""

    def __init__(self, items: Sequence, transform: ReIDTransform, bgr: bool, skip_bad: bool) -> None:
        self.items, self.transform, self.bgr, self.skip_bad = items, transform, bgr, skip_bad

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        try:
            image = as_image(self.items[i], self.bgr, i)
        except OSError as exc:
            if not self.skip_bad:
                raise
            return {"index": i, "error": str(exc)}
        return {"img": self.transform(image)[0], "index": i}


def _collate(batch: list[dict]) -> dict:
    good = [b for b in batch if "img" in b]
    return {"img": torch.stack([b["img"] for b in good]) if good else None,
            "index": torch.tensor([b["index"] for b in good], dtype=torch.long),
            "errors": [(b["index"], b["error"]) for b in batch if "error" in b]}


def _as_items(inputs) -> list | torch.Tensor:
    """A list of single images, or a tensor batch [B, 3, H, W]."""
    if isinstance(inputs, torch.Tensor) and inputs.dim() == 4:
        return inputs if inputs.is_floating_point() else list(inputs)
    if isinstance(inputs, np.ndarray) and inputs.ndim == 4:
        return list(inputs)
    if isinstance(inputs, (str, Path, Image.Image, np.ndarray, torch.Tensor)):
        return [inputs]
    return list(inputs)


class Extractor:
    """Features of images from a trained model (see the module docstring).

    model: a checkpoint (.pt) or weights file (.safetensors) path, or a model with the eval contract
    `model(images, camids[, global_only=True])`; device: "auto" (CUDA when available, else CPU), "cpu", "cuda"...;
    dtype: e.g. torch.bfloat16 runs the model under autocast (None: float32); batch_size, num_workers: of the
    image loader.
    """

    def __init__(self, model: str | Path | nn.Module, device: str | torch.device = "auto",
                 dtype: torch.dtype | None = None, batch_size: int = 64, num_workers: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        if isinstance(model, (str, Path)):
            from .load import load_model

            model = load_model(model)
        self.model = model.to(self.device).eval()
        self.dtype, self.batch_size, self.num_workers = dtype, batch_size, num_workers
        self.data_config = resolve_data_config(self.model)
        self.transform = test_transform(self.model)
        self.num_cameras = int(getattr(self.model, "num_cameras", 0) or 0)

    # -- the model ---------------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.dtype is None or self.dtype == torch.float32:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _camids(self, camids, n: int) -> torch.Tensor | None:
        """None, or [N] int64 with ids beyond the model's cameras as unknown (-1)."""
        if camids is None:
            return None
        ids = torch.as_tensor(np.asarray(camids), dtype=torch.long).reshape(-1)
        if ids.shape[0] != n:
            raise ValueError(f"camids: one per image, got {ids.shape[0]} for {n} images")
        if self.num_cameras > 0:
            ids = torch.where(ids >= self.num_cameras, -1, ids)
        return ids

    @torch.no_grad()
    def forward(self, images: torch.Tensor, camids: torch.Tensor | None, parts: bool) -> dict[str, torch.Tensor]:
        """One batch [B, 3, H, W] (normalised) -> {"features": [B, D]} or with `parts` also {"parts": [B, 1+P, D],
        "visibility": [B, 1+P]}: float32 on the CPU."""
        images = images.to(self.device)
        camids = camids.to(self.device) if camids is not None else None
        with self._autocast():
            out = self.model(images, camids) if parts else self.model(images, camids, global_only=True)
        feats = out["features"].float()
        if self.dtype not in (None, torch.float32):  # normalised in reduced precision: again in float32
            feats = F.normalize(feats, dim=-1)
        if not parts:
            return {"features": feats.cpu()}
        return {"features": feats[:, 0].cpu(), "parts": feats.cpu(), "visibility": out["visibility"].float().cpu()}

    # -- inputs ------------------------------------------------------------------------------------------------------
    def run(self, inputs, camids=None, bgr: bool = False, parts: bool = False, skip_bad: bool = False,
            progress: Callable[[int], object] | None = None
            ) -> tuple[dict[str, torch.Tensor], list[int], list[tuple[int, str]]]:
        """(outputs of the kept inputs in order, their indices, [(index, error)] of the unreadable files skipped with
        `skip_bad`; without it an unreadable file raises OSError naming it). `progress(n)` after each batch of n."""
        items = _as_items(inputs)
        ids = self._camids(camids, len(items))
        if isinstance(items, torch.Tensor):
            return self._run_tensor(items, ids, parts), list(range(items.shape[0])), []
        loader = DataLoader(_Inputs(items, self.transform, bgr, skip_bad), batch_size=self.batch_size,
                            num_workers=self.num_workers, collate_fn=_collate)
        chunks, kept, errors = [], [], []
        for batch in loader:
            errors += batch["errors"]
            if batch["img"] is not None:
                chunks.append(self.forward(batch["img"], ids[batch["index"]] if ids is not None else None, parts))
                kept += batch["index"].tolist()
            if progress is not None:
                progress(len(batch["index"]) + len(batch["errors"]))
        return self._cat(chunks, parts), kept, errors

    def _run_tensor(self, images: torch.Tensor, ids: torch.Tensor | None, parts: bool) -> dict[str, torch.Tensor]:
        size = tuple(self.data_config["size"])
        if images.shape[1] != 3 or tuple(images.shape[-2:]) != size:
            raise ValueError(f"a float image tensor must be [B, 3, {size[0]}, {size[1]}], normalised as the model "
                             f"expects (pass uint8 to have it resized and normalised), got {list(images.shape)}")
        step = self.batch_size
        chunks = [self.forward(images[s:s + step], ids[s:s + step] if ids is not None else None, parts)
                  for s in range(0, images.shape[0], step)]
        return self._cat(chunks, parts)

    def _cat(self, chunks: list[dict], parts: bool) -> dict[str, torch.Tensor]:
        if chunks:
            return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
        h, w = self.data_config["size"]
        empty = self.forward(torch.zeros(1, 3, h, w), torch.zeros(1, dtype=torch.long), parts)  # shapes of no image
        return {k: v[:0] for k, v in empty.items()}

    def __call__(self, inputs, camids=None, bgr: bool = False, parts: bool = False) -> torch.Tensor | FeatureSet:
        """Global features [N, D] (L2-normalised, float32, CPU); with `parts` a FeatureSet with the part features
        [N, 1+P, D] and their visibility [N, 1+P] too (paths: the inputs' paths, `#i` for in-memory images)."""
        out, _, _ = self.run(inputs, camids, bgr, parts)
        if not parts:
            return out["features"]
        return self._feature_set(out, inputs, camids)

    def _feature_set(self, out: dict, inputs, camids) -> FeatureSet:
        items = _as_items(inputs)
        n = out["features"].shape[0]
        paths = [str(x) if isinstance(x, (str, Path)) else f"#{i}" for i, x in enumerate(items)] if isinstance(
            items, list) else [f"#{i}" for i in range(n)]
        ids = self._camids(camids, n)
        return FeatureSet(features=out["features"], paths=paths, parts=out["parts"], visibility=out["visibility"],
                          camids=ids)

    # -- trackers ----------------------------------------------------------------------------------------------------
    def crops(self, frame: np.ndarray | torch.Tensor, xyxy_boxes) -> list[np.ndarray]:
        """The boxes' crops of `frame` [H, W, 3] uint8: corners rounded outwards to whole pixels, clipped to the
        frame. ValueError naming a box that is empty inside the frame."""
        frame = frame.cpu().numpy() if isinstance(frame, torch.Tensor) else np.asarray(frame)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"frame must be uint8 [H, W, 3], got {frame.dtype} {list(frame.shape)}")
        h, w = frame.shape[:2]
        boxes = np.asarray(xyxy_boxes.cpu() if isinstance(xyxy_boxes, torch.Tensor) else xyxy_boxes, dtype=np.float64)
        boxes = boxes.reshape(-1, boxes.shape[-1]) if boxes.size else boxes.reshape(0, 4)
        if boxes.shape[1] < 4:
            raise ValueError(f"boxes must be [K, 4] (x1, y1, x2, y2), got {list(boxes.shape)}")
        out = []
        for k, (x1, y1, x2, y2) in enumerate(boxes[:, :4]):
            if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
                raise ValueError(f"box {k} {[x1, y1, x2, y2]} is not finite")
            a, b = min(max(math.floor(x1), 0), w), min(max(math.floor(y1), 0), h)
            c, d = min(max(math.ceil(x2), 0), w), min(max(math.ceil(y2), 0), h)
            if c <= a or d <= b:
                raise ValueError(f"box {k} {[float(x1), float(y1), float(x2), float(y2)]} (x1, y1, x2, y2) is empty "
                                 f"inside the {w}x{h} frame")
            out.append(frame[b:d, a:c])
        return out

    def from_frame(self, frame: np.ndarray | torch.Tensor, xyxy_boxes, bgr: bool = True, camids=None,
                   parts: bool = False) -> torch.Tensor | FeatureSet:
        """Features [K, D] of the K boxes (x1, y1, x2, y2 in pixels; extra columns such as scores are ignored) of
        one frame [H, W, 3] uint8, BGR by default as OpenCV reads it: cropped, batched and extracted."""
        return self(self.crops(frame, xyxy_boxes), camids, bgr, parts)

    def get_features(self, xyxys, img: np.ndarray) -> np.ndarray:
        """BoxMOT's ReID backend call: the L2-normalised features [K, D] (numpy float32) of the boxes of the BGR
        frame `img`, so an Extractor stands in for a tracker's ReID model."""
        return self.from_frame(img, xyxys, bgr=True).numpy()
