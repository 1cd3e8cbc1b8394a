"""Occluded-REID (test only): occluded images are the query (cam 0), whole-body images the gallery (cam 1)."""

from __future__ import annotations

from ..records import ReIDData
from ..registry import register_dataset
from .base import finalize, find_dataset_dir
from .pid_parsers import parse_folder, pid_from_folder

CANDIDATES = ("Occluded_REID", "OccludedREID", "occluded_reid")
LAYOUT = "<root>/Occluded_REID/{occluded_body_images,whole_body_images}/<pid>/<image>.tif|jpg"


@register_dataset("occluded_reid")
def occluded_reid(root: str, *, mask_dir=None, verify_images: bool = False, on_bad_image: str = "error") -> ReIDData:
    """Occluded-REID: 200 ids, 1,000 occluded queries (cam 0), 1,000 whole-body gallery images (cam 1).

    Test only (train on Market-1501): `train` is empty. pid = the image's folder name.
    """
    ddir = find_dataset_dir(root, CANDIDATES, ["occluded_body_images", "whole_body_images"], LAYOUT)
    splits = {"query": parse_folder(ddir / "occluded_body_images", pid_from_folder(0), "occluded_reid/query"),
              "gallery": parse_folder(ddir / "whole_body_images", pid_from_folder(1), "occluded_reid/gallery")}
    return finalize("occluded_reid", ddir, splits, mask_dir=mask_dir, verify=verify_images,
                    on_bad_image=on_bad_image, test_only=True)
