"""The part schema of the masks (labels, flip pairs, the no-mask value): defined in `amfor.schema`, which the
models read too, and re-exported here for the data pipeline."""

from __future__ import annotations

from amfor.schema import FLIP_PAIRS, NO_MASK, NUM_PARTS, PART_NAMES

__all__ = ["FLIP_PAIRS", "NO_MASK", "NUM_PARTS", "PART_NAMES"]
