"""Procedurally generated occluded ReID data (the project's default dataset), saved in the Market-1501 layout."""

from .generate import SIZES, SyntheticConfig, ensure_generated, generate, plan, resolve_config
from .person import FLIP_PAIRS, PART_NAMES

__all__ = ["FLIP_PAIRS", "PART_NAMES", "SIZES", "SyntheticConfig", "ensure_generated", "generate", "plan",
           "resolve_config"]
