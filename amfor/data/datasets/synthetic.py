"""The built-in synthetic occluded dataset: generated on first use (cached), then parsed like Market-1501."""

from __future__ import annotations

from ..records import ReIDData
from ..registry import register_dataset
from ..synthetic import ensure_generated
from .market_style import build_market_style

EXTRA_FOLDERS = {"query_whole": "query_whole", "val_query": "val_query", "val_gallery": "val_gallery",
                 "val_query_whole": "val_query_whole"}


@register_dataset("synthetic")
def synthetic(root: str, *, size: str = "default", seed: int = 0, verify_images: bool = False,
              on_bad_image: str = "error", **overrides) -> ReIDData:
    """Generate (or reuse) `<root>/synthetic_<size>_seed<seed>` and parse it.

    Splits: train (relabelled), query (occluded), gallery (mostly whole-body, pid 0 distractors), and
    extra `query_whole` (the same queries un-occluded), `val_query`/`val_gallery`/`val_query_whole`
    (held-out training-side ids). Every image has an exact part-label mask. `overrides` change fields of
    the size preset (see `amfor.data.synthetic.SyntheticConfig`).
    """
    folder = ensure_generated(root, size=size, seed=seed, **overrides)
    num_cams = overrides.get("num_cams")
    return build_market_style("synthetic", folder.parent, (folder.name,), num_cams, extra_folders=EXTRA_FOLDERS,
                              verify_images=verify_images, on_bad_image=on_bad_image)
