"""Folder-parsing helpers shared by the dataset parsers: locate, list, parse names, attach masks, verify."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from ..records import ImageRecord, ReIDData, logger, relabel

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MARKET_PATTERN = re.compile(r"([-\d]+)_c(\d+)")

ParseFn = Callable[[Path], "tuple[int, int] | None"]


class DatasetWarning(UserWarning):
    """Something in a dataset folder was skipped or is missing (unparseable names, bad images, masks)."""


def find_dataset_dir(root: str | Path, candidates: Sequence[str], required: Sequence[str], layout: str) -> Path:
    """The first of `root/<candidate>` (then `root` itself) that holds every `required` entry.

    Raises FileNotFoundError naming the expected `layout` when none does.
    """
    root = Path(root).expanduser()
    for cand in [*candidates, "."]:
        path = (root / cand).resolve()
        if all((path / req).exists() for req in required):
            return path
    tried = ", ".join(str(root / c) for c in candidates)
    raise FileNotFoundError(f"dataset not found under {root} (tried {tried} and the root itself); "
                            f"expected layout: {layout}")


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in `folder` (sorted; non-image files such as Thumbs.db are ignored)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"missing folder: {folder}")
    files = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in files if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def market_name_parser(num_cams: int | None, pattern: re.Pattern = MARKET_PATTERN) -> ParseFn:
    """Parser for `0002_c1s1_000451_03.jpg` / `0001_c2_f0046182.jpg`: (pid, 0-based cam) or None."""

    def parse(path: Path) -> tuple[int, int] | None:
        match = pattern.search(path.name)
        if match is None:
            return None
        pid, cam = int(match.group(1)), int(match.group(2)) - 1
        if cam < 0 or (num_cams is not None and cam >= num_cams):
            return None
        return pid, cam

    return parse


def parse_images(paths: Sequence[Path], parse: ParseFn, where: str) -> list[ImageRecord]:
    """Records for `paths` via `parse`; drops pid -1 (junk); warns with a count on unparseable names."""
    records, bad = [], []
    for path in paths:
        parsed = parse(path)
        if parsed is None:
            bad.append(path.name)
        elif parsed[0] != -1:
            records.append(ImageRecord(str(path), parsed[0], parsed[1]))
    if bad:
        msg = f"{where}: {len(bad)} file name(s) could not be parsed and were skipped, e.g. {bad[:5]}"
        logger.warning(msg)
        warnings.warn(msg, DatasetWarning, stacklevel=3)
    return records


def attach_masks(records: list[ImageRecord], dataset_dir: Path, mask_dir: str | Path | None) -> list[ImageRecord]:
    """Set `mask_path` from the parallel tree `<mask_dir>/<path relative to dataset_dir>.png`.

    `mask_dir` None means `<dataset_dir>/masks` if that folder exists (else no masks). Images without a
    mask file keep `mask_path=None` and are reported with a warning.
    """
    mask_root = Path(mask_dir) if mask_dir is not None else dataset_dir / "masks"
    if not mask_root.is_dir():
        if mask_dir is not None:
            raise FileNotFoundError(f"mask folder not found: {mask_root}")
        return records
    out, missing = [], 0
    for r in records:
        mask = mask_root / Path(r.path).relative_to(dataset_dir).with_suffix(".png")
        found = mask.is_file()
        missing += not found
        out.append(r._replace(mask_path=str(mask) if found else None))
    if missing:
        msg = f"{missing} of {len(records)} images have no parsing mask under {mask_root}"
        logger.warning(msg)
        warnings.warn(msg, DatasetWarning, stacklevel=3)
    return out


def verify_images(records: list[ImageRecord], on_bad_image: str) -> list[ImageRecord]:
    """Open every image header; a bad one raises (`"error"`) or is dropped with a warning (`"skip"`)."""
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
    good, bad = [], []
    for r in records:
        try:
            with Image.open(r.path) as img:
                img.verify()
            good.append(r)
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
            if on_bad_image == "error":
                raise OSError(f"unreadable image: {r.path} ({exc})") from exc
            bad.append(r.path)
    if bad:
        msg = f"skipped {len(bad)} unreadable image(s), e.g. {bad[:5]}"
        logger.warning(msg)
        warnings.warn(msg, DatasetWarning, stacklevel=3)
    return good


def finalize(name: str, dataset_dir: Path, splits: dict[str, list[ImageRecord]], *, mask_dir: str | Path | None = None,
             verify: bool = False, on_bad_image: str = "error", test_only: bool = False) -> ReIDData:
    """Attach masks, optionally verify images, relabel train pids (sorted), build and log the ReIDData."""
    for split, records in splits.items():
        records = attach_masks(records, dataset_dir, mask_dir)
        splits[split] = verify_images(records, on_bad_image) if verify else records
    train = relabel(splits.pop("train", []))
    query, gallery = splits.pop("query"), splits.pop("gallery")
    data = ReIDData(name, str(dataset_dir), train, query, gallery, extra=splits, test_only=test_only)
    data.log_summary()
    return data
