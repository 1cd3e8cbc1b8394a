"""P-DukeMTMC-reID: train and test each split into occluded (cam 0) and whole-body (cam 1) images."""

from __future__ import annotations

from ..records import ReIDData
from ..registry import register_dataset
from .base import finalize, find_dataset_dir
from .pid_parsers import parse_folder, pid_from_prefix

CANDIDATES = ("P-DukeMTMC-reID", "P-DukeMTMC-reid", "p_dukemtmc_reid")
LAYOUT = "<root>/P-DukeMTMC-reID/{train,test}/{occluded_body_images,whole_body_images}/<pid>/<pid>_*.jpg"


@register_dataset("p_dukemtmc")
def p_dukemtmc(root: str, *, mask_dir=None, verify_images: bool = False, on_bad_image: str = "error") -> ReIDData:
    """P-DukeMTMC-reID. Train = occluded (cam 0) + whole (cam 1) images, relabelled; test query = occluded
    (cam 0), gallery = whole (cam 1). pid = the file name's prefix before the first '_'."""
    required = [f"{s}/{k}_body_images" for s in ("train", "test") for k in ("occluded", "whole")]
    ddir = find_dataset_dir(root, CANDIDATES, required, LAYOUT)

    def part(split: str, kind: str, cam: int):
        return parse_folder(ddir / split / f"{kind}_body_images", pid_from_prefix(cam), f"p_dukemtmc/{split}/{kind}")

    splits = {"train": part("train", "occluded", 0) + part("train", "whole", 1),
              "query": part("test", "occluded", 0), "gallery": part("test", "whole", 1)}
    return finalize("p_dukemtmc", ddir, splits, mask_dir=mask_dir, verify=verify_images, on_bad_image=on_bad_image)
