"""The ablation's variants: which model switches each row of the table turns on, the row its delta is taken
against, and how many seeds it gets by default (plan.py runs them, report.py tabulates them).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from amfor.config import ConfigError
from amfor.models.amfor import SWITCHES

# the model's component switches, and camera centring (a model keyword outside SWITCHES: models/camera.py)
KNOBS = (*SWITCHES, "camera_centering")


def _on(*names: str) -> dict[str, bool]:
    """Model keywords of KNOBS with `names` on and every other one off."""
    return {s: s in names for s in KNOBS}


def _full_without(*names: str) -> dict[str, bool]:
    return _on(*(s for s in KNOBS if s not in names))


# teacher_student and part_recon need parts, amgd needs teacher_student (AMFOR._check_switches)
VARIANTS: dict[str, dict[str, bool]] = {
    "baseline": _on(),  # TransReID-style global feature, ID + triplet
    "+camera": _on("camera_centering"),
    "+parts": _on("camera_centering", "parts", "teacher_student"),
    "+amff": _on("camera_centering", "parts", "teacher_student", "amff", "text"),
    "+hpr": _on("camera_centering", "parts", "teacher_student", "amff", "text", "hpr", "part_recon"),
    "full": _on(*KNOBS),
    "full-camera": _full_without("camera_centering"),
    "full-amff": _full_without("amff", "text"),
    "full-text": _full_without("text"),
    "full-ts": _full_without("teacher_student", "amgd"),
    "full-amgd": _full_without("amgd"),
    "full-hpr": _full_without("hpr"),
    "full-part_recon": _full_without("part_recon"),
    "full-parts": _full_without("parts", "teacher_student", "amgd", "part_recon"),
}
DEFAULT_SEEDS = {"baseline": 3, "full": 3}  # every other variant: 2


def default_seeds(variant: str) -> int:
    return DEFAULT_SEEDS.get(variant, 2)


def reference(variant: str) -> str | None:
    """The row a variant's delta is taken against: baseline for `+x`, full for `full-x`, none for those two."""
    return "baseline" if variant.startswith("+") else "full" if variant.startswith("full-") else None


def switch_overrides(variant: str) -> list[str]:
    """`--set` items of `variant`'s switches: model.kwargs.<switch>=true|false."""
    return [f"model.kwargs.{k}={str(on).lower()}" for k, on in VARIANTS[variant].items()]


def check_variants(names: Iterable[str]) -> list[str]:
    """`names` in the table's order; an unknown one -> ConfigError naming the closest valid name."""
    names = list(dict.fromkeys(names))
    for name in names:
        if name not in VARIANTS:
            near = difflib.get_close_matches(name, list(VARIANTS), n=1, cutoff=0.4)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise ConfigError(f"unknown variant '{name}'{hint} (variants: {', '.join(VARIANTS)})")
    return [v for v in VARIANTS if v in names]

