"""Parsers for pid-from-folder and pid-from-name-prefix layouts (Occluded-REID, P-DukeMTMC, Partial-REID)."""

from __future__ import annotations

from pathlib import Path

from ..records import ImageRecord
from .base import list_images, parse_images


def pid_from_folder(camid: int):
    """Parse fn: pid = integer name of the image's parent folder, fixed camera `camid`."""

    def parse(path: Path) -> tuple[int, int] | None:
        return (int(path.parent.name), camid) if path.parent.name.lstrip("-").isdigit() else None

    return parse


def pid_from_prefix(camid: int):
    """Parse fn: pid = integer before the first '_' of the file name, fixed camera `camid`."""

    def parse(path: Path) -> tuple[int, int] | None:
        head = path.name.split("_")[0]
        return (int(head), camid) if head.lstrip("-").isdigit() else None

    return parse


def parse_folder(folder: Path, parse, where: str) -> list[ImageRecord]:
    """All images under `folder` (recursively), parsed by `parse`."""
    return parse_images(list_images(folder, recursive=True), parse, where)
