"""Procedurally generated occluded ReID data (the project's default dataset), saved in the Market-1501 layout."""

from ..parts import FLIP_PAIRS, PART_NAMES
from .generate import SIZES, SyntheticConfig, ensure_generated, generate, plan, resolve_config

__all__ = ["FLIP_PAIRS", "PART_NAMES", "SIZES", "SyntheticConfig", "ensure_generated", "generate", "plan",
           "resolve_config"]
