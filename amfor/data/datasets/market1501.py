"""Market-1501: `Market-1501-v15.09.15/` or `market1501/` with the three standard folders, 6 cameras."""

from __future__ import annotations

from ..records import ReIDData
from ..registry import register_dataset
from .market_style import build_market_style

CANDIDATES = ("Market-1501-v15.09.15", "market1501", "market1501/Market-1501-v15.09.15", "Market-1501")


@register_dataset("market1501")
def market1501(root: str, **kwargs) -> ReIDData:
    """Market-1501 (names `0002_c1s1_000451_03.jpg`). Official: train 12,936 imgs / 751 ids,
    query 3,368 / 750, gallery 15,913 after dropping pid -1. kwargs: mask_dir, verify_images, on_bad_image."""
    return build_market_style("market1501", root, CANDIDATES, num_cams=6, **kwargs)
