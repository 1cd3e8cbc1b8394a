"""Budgets on round 3's scale: round 3's calibration windows (2026-12-01 19:39-19:51, 9-minute runs, reused in
rounds 4 and 5) fitted to every variant's training step timed together now (`plan.fit_to_step_costs`). Rounds 6
and 7 were budgeted this way, so their step counts share one scale whatever machine times the steps.

Run from the repository root:

    python -m projects.ablation.rounds.fit_round3_windows runs/ablation-r7
    python -m projects.ablation.rounds.fit_round3_windows runs/ablation-r7-30 --scale runs/ablation-r7 3.43 30 \
        --cap 2720

The first reads docs/ablation-data/r5/budgets.json (the windows), times all 14 variants' steps (about 5 minutes,
the machine to itself) and writes <output>/budgets.json. Each round-3 window fixed its step count at stage-2 step
56 (8 skipped + 48 timed) with batch 64; those two figures, not stored then, are filled in.

The second writes a longer budget from a fitted folder: every count multiplied by FACTOR (the ratio of this
machine's own calibrations at the two budgets, measured by the caller), for `--budget-minutes MINUTES`, and at
most `--cap` steps: a clock-budgeted run never trains past `train.epochs` (the calibrations' `cap_steps`, 2720 for
the demo's 120 epochs).
Neither overwrites an existing budgets.json: its step counts may already be training.
"""
import argparse
import json
import sys
from pathlib import Path

from projects.ablation import plan as ablation

WINDOWS = Path("docs/ablation-data/r5/budgets.json")


def fit(out: Path) -> dict:
    """Round 3's windows of every variant, fitted to step costs timed now."""
    budgets = json.loads(WINDOWS.read_text())
    budgets.pop("settings", None)  # round 3's; the folder's own are written by its first `python -m projects.ablation`
    for entry in budgets["variants"].values():
        entry.update(fix_step=56, batch_size=64, source="calibration", window_source=entry["source"])
    ablation.fit_to_step_costs(ablation.make_plan(out), budgets, list(ablation.VARIANTS))
    for entry in budgets["variants"].values():
        entry["source"] = "round-3 calibration window, fitted to step costs timed together"
        if "window_steps" not in entry:
            sys.exit("the fit did not run")
    return budgets


def scale(source: Path, factor: float, minutes: float, cap: int | None) -> dict:
    """A fitted folder's budgets with every step count times `factor` (at most `cap`), for a `minutes` budget."""
    budgets = json.loads((source / "budgets.json").read_text())
    budgets.pop("settings", None)  # the new folder's own, written by its first `python -m projects.ablation`
    for entry in budgets["variants"].values():
        steps = round(entry["steps"] * factor)
        entry.update(steps_9min=entry["steps"], steps=min(steps, cap) if cap else steps, cap_steps=cap,
                     budget_minutes=minutes,
                     source=f"{entry['source']}; x {factor} for a {minutes:g}-minute budget")
    return budgets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--scale", nargs=3, metavar=("FOLDER", "FACTOR", "MINUTES"))
    parser.add_argument("--cap", type=int, help="with --scale: the most steps of a run")
    args = parser.parse_args()
    if (args.output / "budgets.json").exists():
        sys.exit(f"{args.output / 'budgets.json'} exists: its step counts may already be training; not refitted")
    args.output.mkdir(parents=True, exist_ok=True)
    if args.scale:
        budgets = scale(Path(args.scale[0]), float(args.scale[1]), float(args.scale[2]), args.cap)
    else:
        budgets = fit(args.output)
    ablation.save_budgets(args.output, budgets)
    print(json.dumps({v: e["steps"] for v, e in budgets["variants"].items()}))


if __name__ == "__main__":
    main()
