"""Per-identity appearance: colours, patterns, garment types, accessories and body shape."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .palette import CLOTHES, HAIR, PATTERNS, SKIN


@dataclass(frozen=True)
class Identity:
    """Everything that stays fixed for one person across images (all colours are RGB float arrays)."""

    skin: np.ndarray
    hair: np.ndarray
    hair_style: str          # short | long | cap | bald
    cap: np.ndarray
    top: np.ndarray
    top2: np.ndarray
    top_pattern: str
    top_period: int
    sleeves: str             # long | short
    bottom: np.ndarray
    bottom_pattern: str
    bottom_kind: str         # trousers | shorts
    shoes: np.ndarray
    bag: str                 # none | backpack | handbag
    bag_color: np.ndarray
    bag_side: int            # -1 left, +1 right (image space)
    height: float            # relative body height
    width: float             # relative body width
    head: float              # relative head size


def _pick(rng: np.random.Generator, table: np.ndarray) -> np.ndarray:
    return table[rng.integers(len(table))].copy()


def sample_identity(rng: np.random.Generator) -> Identity:
    """Draw one identity; every colour comes from the shared palettes (combinations repeat)."""
    return Identity(
        skin=_pick(rng, SKIN), hair=_pick(rng, HAIR),
        hair_style=str(rng.choice(["short", "short", "long", "cap", "bald"])), cap=_pick(rng, CLOTHES),
        top=_pick(rng, CLOTHES), top2=_pick(rng, CLOTHES), top_pattern=str(rng.choice(PATTERNS)),
        top_period=int(rng.integers(2, 5)), sleeves=str(rng.choice(["long", "short"])),
        bottom=_pick(rng, CLOTHES), bottom_pattern=str(rng.choice(["solid", "solid", "solid", "checks", "vstripes"])),
        bottom_kind=str(rng.choice(["trousers", "trousers", "shorts"])), shoes=_pick(rng, CLOTHES),
        bag=str(rng.choice(["none", "none", "backpack", "handbag"])), bag_color=_pick(rng, CLOTHES),
        bag_side=int(rng.choice([-1, 1])), height=float(rng.uniform(0.9, 1.04)),
        width=float(rng.uniform(0.85, 1.2)), head=float(rng.uniform(0.9, 1.1)),
    )
