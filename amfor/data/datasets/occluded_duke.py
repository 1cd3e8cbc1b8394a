"""Occluded-Duke: `Occluded_Duke/` with the three standard folders and Duke names, 8 cameras."""

from __future__ import annotations

from ..records import ReIDData
from ..registry import register_dataset
from .market_style import build_market_style

CANDIDATES = ("Occluded_Duke", "occluded_duke", "Occluded-Duke")


@register_dataset("occluded_duke")
def occluded_duke(root: str, **kwargs) -> ReIDData:
    """Occluded-Duke. Official: train 15,618 / 702 ids, query 2,210 / 519, gallery 17,661 / 1,110."""
    return build_market_style("occluded_duke", root, CANDIDATES, num_cams=8, **kwargs)
