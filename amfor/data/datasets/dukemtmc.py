"""DukeMTMC-reID: `DukeMTMC-reID/` with the three standard folders, names `0001_c2_f0046182.jpg`, 8 cameras."""

from __future__ import annotations

from ..records import ReIDData
from ..registry import register_dataset
from .market_style import build_market_style

CANDIDATES = ("DukeMTMC-reID", "dukemtmc-reid/DukeMTMC-reID", "dukemtmcreid/DukeMTMC-reID")


@register_dataset("dukemtmc")
def dukemtmc(root: str, **kwargs) -> ReIDData:
    """DukeMTMC-reID. Official: train 16,522 / 702 ids, query 2,228 / 702, gallery 17,661 / 1,110."""
    return build_market_style("dukemtmc", root, CANDIDATES, num_cams=8, **kwargs)
