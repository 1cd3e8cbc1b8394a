"""Image records and the split container every dataset parser returns."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

logger = logging.getLogger("amfor.data")


class ImageRecord(NamedTuple):
    """One image: `path`, person id `pid`, 0-based camera id `camid`, optional parsing-mask path.

    A NamedTuple so the usual ``path, pid, camid, _ = record`` unpacking works; `mask_path` is None
    when the dataset has no human-parsing mask for this image.
    """

    path: str
    pid: int
    camid: int
    mask_path: str | None = None


def relabel(records: Iterable[ImageRecord]) -> list[ImageRecord]:
    """Map training pids to 0..C-1 in **sorted** raw-pid order (identical on every rank and run)."""
    records = list(records)
    mapping = {pid: label for label, pid in enumerate(sorted({r.pid for r in records}))}
    return [r._replace(pid=mapping[r.pid]) for r in records]


def split_stats(records: Sequence[ImageRecord]) -> tuple[int, int, int]:
    """(number of ids, number of images, number of cameras) of a split."""
    return len({r.pid for r in records}), len(records), len({r.camid for r in records})


@dataclass
class ReIDData:
    """The parsed splits of one dataset.

    `train` pids are relabelled 0..C-1 (sorted raw order); `query`/`gallery` keep raw pids
    (0 = distractor, kept in the gallery). `extra` holds further named splits (e.g. the synthetic
    set's `query_whole`, `val_query`, `val_gallery`). `test_only` datasets have an empty `train`.
    """

    name: str
    root: str
    train: list[ImageRecord]
    query: list[ImageRecord]
    gallery: list[ImageRecord]
    extra: dict[str, list[ImageRecord]] = field(default_factory=dict)
    test_only: bool = False

    def __post_init__(self) -> None:
        required = {"query": self.query, "gallery": self.gallery}
        if not self.test_only:
            required["train"] = self.train
        for split, records in {**required, **self.extra}.items():
            if len(records) == 0:
                raise ValueError(f"{self.name}: split '{split}' is empty (root: {self.root})")

    @property
    def num_train_pids(self) -> int:
        return len({r.pid for r in self.train})

    @property
    def num_train_cams(self) -> int:
        return len({r.camid for r in self.train})

    @property
    def train_cameras(self) -> set[int]:
        """The camera ids training sees (-1, an unknown camera, left out)."""
        return {r.camid for r in self.train if r.camid >= 0}

    @property
    def num_cameras(self) -> int:
        """Camera ids 0 .. max over every split (train, query, gallery, extra): the model's `num_cameras`, so that
        a camera only the test splits hold is in range (docs/model.md, "Cameras"). 0 when no image has one."""
        return 1 + max((r.camid for split in self.splits().values() for r in split), default=-1)

    @property
    def num_query_pids(self) -> int:
        return len({r.pid for r in self.query})

    @property
    def num_gallery_pids(self) -> int:
        return len({r.pid for r in self.gallery})

    def splits(self) -> dict[str, list[ImageRecord]]:
        """All splits by name: train, query, gallery, then the extra ones."""
        return {"train": self.train, "query": self.query, "gallery": self.gallery, **self.extra}

    def summary(self) -> str:
        """The usual ReID summary table: ids / images / cameras per split."""
        lines = [f"=> {self.name} ({self.root})", "  ----------------------------------------",
                 "  subset          | # ids | # images | # cameras", "  ----------------------------------------"]
        for split, records in self.splits().items():
            ids, imgs, cams = split_stats(records)
            lines.append(f"  {split:<15} | {ids:5d} | {imgs:8d} | {cams:9d}")
        lines.append("  ----------------------------------------")
        return "\n".join(lines)

    def log_summary(self) -> str:
        text = self.summary()
        logger.info("%s", text)
        return text
