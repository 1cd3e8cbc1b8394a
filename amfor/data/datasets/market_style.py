"""Shared builder for datasets in the Market-1501 three-folder layout (Market, Duke, Occluded-Duke, custom)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..records import ReIDData
from .base import finalize, find_dataset_dir, list_images, market_name_parser, parse_images

SPLIT_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}


def build_market_style(name: str, root: str | Path, candidates: Sequence[str], num_cams: int | None, *,
                       extra_folders: dict[str, str] | None = None, mask_dir: str | Path | None = None,
                       verify_images: bool = False, on_bad_image: str = "error") -> ReIDData:
    """Parse `bounding_box_train`, `query`, `bounding_box_test` (+ `extra_folders`) with Market names.

    Names `<pid>_c<cam>...`: pid -1 (junk) dropped, pid 0 (distractors) kept, cameras made 0-based and
    checked against `num_cams` (None: no check); unparseable names are counted and warned about.
    """
    folders = {**SPLIT_FOLDERS, **(extra_folders or {})}
    layout = (f"<root>/{{{' | '.join(candidates)}}}/{{{', '.join(folders.values())}}}/"
              "<pid>_c<cam>s<seq>_<frame>_<box>.jpg")
    dataset_dir = find_dataset_dir(root, candidates, list(folders.values()), layout)
    parse = market_name_parser(num_cams)
    splits = {split: parse_images(list_images(dataset_dir / folder), parse, f"{name}/{folder}")
              for split, folder in folders.items()}
    return finalize(name, dataset_dir, splits, mask_dir=mask_dir, verify=verify_images, on_bad_image=on_bad_image)
