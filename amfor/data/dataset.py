"""Torch Dataset over image records, returning dicts with image, ids, part mask and occlusion map."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .datasets.base import DatasetWarning
from .records import ImageRecord
from .transforms import ReIDTransform


class ReIDImageDataset(Dataset):
    """records -> {"img": [3, H, W] float, "pid": int, "camid": int, "mask": [H, W] long (-1: no mask),
    "occlusion": [H, W] bool, "path": str, "index": int}.

    on_bad_image: "error" raises naming the file; "skip" warns and returns the next readable sample
    instead (training only: a test loader must see every image).
    """

    def __init__(self, records: Sequence[ImageRecord], transform: ReIDTransform | None = None,
                 load_masks: bool = True, on_bad_image: str = "error") -> None:
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        if len(records) == 0:
            raise ValueError("records is empty")
        self.records, self.transform = list(records), transform or ReIDTransform(train=False)
        self.load_masks, self.on_bad_image = load_masks, on_bad_image

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> tuple[Image.Image, np.ndarray | None]:
        """The RGB image and (if any) its part mask; OSError naming the file when unreadable."""
        rec = self.records[index]
        try:
            with Image.open(rec.path) as img:
                image = img.convert("RGB")
            mask = None
            if self.load_masks and rec.mask_path is not None:
                with Image.open(rec.mask_path) as m:
                    mask = np.asarray(m, dtype=np.int64)
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
            raise OSError(f"cannot read image {rec.path} (mask {rec.mask_path}): {exc}") from exc
        return image, mask

    def __getitem__(self, index: int) -> dict:
        for attempt in range(len(self.records)):
            k = (index + attempt) % len(self.records)
            try:
                image, mask = self.load(k)
                break
            except OSError as exc:
                if self.on_bad_image == "error":
                    raise
                warnings.warn(f"skipping unreadable sample: {exc}", DatasetWarning, stacklevel=2)
        else:
            raise OSError("no readable image in the dataset")
        rec = self.records[k]
        img, part, occ = self.transform(image, mask)
        return {"img": img, "pid": rec.pid, "camid": rec.camid, "mask": part, "occlusion": occ, "path": rec.path,
                "index": k}


def image_source(records: Sequence[ImageRecord], size: tuple[int, int] = (128, 64)):
    """Callable returning a random record's image as [3, H, W] float in [0, 1] (occluder crops)."""

    def draw() -> torch.Tensor:
        rec = records[int(torch.randint(len(records), (1,)))]
        with Image.open(rec.path) as img:
            arr = np.asarray(img.convert("RGB").resize((size[1], size[0])), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1)

    return draw
