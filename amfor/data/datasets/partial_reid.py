"""Partial-REID (test only): partial-body images are the query (cam 0), whole-body images the gallery (cam 1)."""

from __future__ import annotations

from ..records import ReIDData
from ..registry import register_dataset
from .base import finalize, find_dataset_dir
from .pid_parsers import parse_folder, pid_from_prefix

CANDIDATES = ("Partial_REID", "Partial-REID", "PartialREID", "partial_reid")
LAYOUT = "<root>/Partial_REID/{partial_body_images,whole_body_images}/<pid>_<n>.jpg"


@register_dataset("partial_reid")
def partial_reid(root: str, *, mask_dir=None, verify_images: bool = False, on_bad_image: str = "error") -> ReIDData:
    """Partial-REID: 60 ids, 300 partial queries (cam 0) and 300 whole-body gallery images (cam 1).

    Test only: `train` is empty. pid = the file name's prefix before the first '_'.
    """
    ddir = find_dataset_dir(root, CANDIDATES, ["partial_body_images", "whole_body_images"], LAYOUT)
    splits = {"query": parse_folder(ddir / "partial_body_images", pid_from_prefix(0), "partial_reid/query"),
              "gallery": parse_folder(ddir / "whole_body_images", pid_from_prefix(1), "partial_reid/gallery")}
    return finalize("partial_reid", ddir, splits, mask_dir=mask_dir, verify=verify_images,
                    on_bad_image=on_bad_image, test_only=True)
