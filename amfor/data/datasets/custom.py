"""A user's own dataset: Market-style three folders, or `<split>/<pid>/<image>` folders with a camera per split."""

from __future__ import annotations

from pathlib import Path

from ..records import ReIDData
from ..registry import register_dataset
from .base import finalize
from .market_style import SPLIT_FOLDERS, build_market_style
from .pid_parsers import parse_folder, pid_from_folder

DEFAULT_CAMIDS = {"train": 0, "query": 0, "gallery": 1}
PID_FOLDERS = {"train": "train", "query": "query", "gallery": "gallery"}


def _detect_layout(root: Path) -> str:
    if all((root / f).is_dir() for f in SPLIT_FOLDERS.values()):
        return "market"
    if all((root / f).is_dir() for f in PID_FOLDERS.values()):
        return "pid_folders"
    raise FileNotFoundError(f"custom dataset: {root} has neither {{{', '.join(SPLIT_FOLDERS.values())}}} with "
                            f"Market-style names nor {{{', '.join(PID_FOLDERS.values())}}}/<pid>/<image>")


@register_dataset("custom")
def custom(root: str, *, layout: str = "auto", camids: dict[str, int] | None = None, num_cams: int | None = None,
           mask_dir=None, verify_images: bool = False, on_bad_image: str = "error") -> ReIDData:
    """Parse a custom folder.

    layout "market": `bounding_box_train`, `query`, `bounding_box_test` with `<pid>_c<cam>...` names
    (optionally checked against `num_cams`); layout "pid_folders": `train|query|gallery/<pid>/<image>`,
    the camera of each split from `camids` (default train 0, query 0, gallery 1 so that query and
    gallery never share a camera; -1: unknown). "auto" picks whichever exists. A training run builds the model
    with the cameras of every split (`ReIDData.num_cameras`: 2 by default here); the gallery's camera, never
    seen in training, then gets the seen cameras' mean offsets (docs/model.md, "Cameras").
    """
    rootp = Path(root).expanduser()
    layout = _detect_layout(rootp) if layout == "auto" else layout
    if layout == "market":
        return build_market_style("custom", rootp, (), num_cams, mask_dir=mask_dir, verify_images=verify_images,
                                  on_bad_image=on_bad_image)
    if layout != "pid_folders":
        raise ValueError(f"layout must be 'auto', 'market' or 'pid_folders', got {layout!r}")
    cams = {**DEFAULT_CAMIDS, **(camids or {})}
    splits = {s: parse_folder(rootp / f, pid_from_folder(cams[s]), f"custom/{f}") for s, f in PID_FOLDERS.items()}
    return finalize("custom", rootp.resolve(), splits, mask_dir=mask_dir, verify=verify_images,
                    on_bad_image=on_bad_image)
