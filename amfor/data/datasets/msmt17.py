"""MSMT17: image folders plus `list_{train,val,query,gallery}.txt` files; 15 cameras."""

from __future__ import annotations

import warnings
from pathlib import Path

from ..records import ImageRecord, ReIDData, logger
from ..registry import register_dataset
from .base import DatasetWarning, finalize, find_dataset_dir

CANDIDATES = ("MSMT17", "MSMT17_V1", "MSMT17_V2", "msmt17/MSMT17_V1", "msmt17/MSMT17_V2", "msmt17")
LAYOUT = ("<root>/MSMT17/{train,test}/<pid>/<image> + list_{train,val,query,gallery}.txt, lines "
          "'0000/0000_000_01_0303morning_0015_0.jpg 0'")
NUM_CAMS = 15


def _image_dir(ddir: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (ddir / name).is_dir():
            return ddir / name
    raise FileNotFoundError(f"MSMT17: none of {names} found in {ddir}; expected layout: {LAYOUT}")


def parse_list_file(list_file: Path, image_dir: Path) -> list[ImageRecord]:
    """Records from `list_*.txt`: pid = the label column, camera = `name.split('_')[2] - 1`."""
    records, bad = [], []
    for line in list_file.read_text().splitlines():
        parts = line.split()
        if not parts:
            continue
        try:
            rel, pid = parts[0], int(parts[1])
            cam = int(Path(rel).name.split("_")[2]) - 1
            if not 0 <= cam < NUM_CAMS:
                raise ValueError(cam)
        except (IndexError, ValueError):
            bad.append(line)
            continue
        if pid != -1:
            records.append(ImageRecord(str(image_dir / rel), pid, cam))
    if bad:
        msg = f"msmt17/{list_file.name}: {len(bad)} line(s) could not be parsed and were skipped, e.g. {bad[:5]}"
        logger.warning(msg)
        warnings.warn(msg, DatasetWarning, stacklevel=2)
    return records


@register_dataset("msmt17")
def msmt17(root: str, *, combine_val: bool = True, mask_dir=None, verify_images: bool = False,
           on_bad_image: str = "error") -> ReIDData:
    """MSMT17 (V1 `train/test` or V2 `mask_train_v2/mask_test_v2`). Train = list_train (+ list_val when
    `combine_val`, the usual protocol), relabelled. Official: 4,101 ids, 15 cams; train+val 32,621,
    query 11,659, gallery 82,161."""
    lists = ["list_train.txt", "list_query.txt", "list_gallery.txt"] + (["list_val.txt"] if combine_val else [])
    ddir = find_dataset_dir(root, CANDIDATES, lists, LAYOUT)
    train_dir = _image_dir(ddir, ("train", "mask_train_v2"))
    test_dir = _image_dir(ddir, ("test", "mask_test_v2"))
    train = parse_list_file(ddir / "list_train.txt", train_dir)
    if combine_val:
        train += parse_list_file(ddir / "list_val.txt", train_dir)
    splits = {"train": train, "query": parse_list_file(ddir / "list_query.txt", test_dir),
              "gallery": parse_list_file(ddir / "list_gallery.txt", test_dir)}
    return finalize("msmt17", ddir, splits, mask_dir=mask_dir, verify=verify_images, on_bad_image=on_bad_image)
