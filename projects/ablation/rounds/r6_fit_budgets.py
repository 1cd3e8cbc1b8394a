"""Round 6's budgets: round 3's calibration windows (2026-12-01 19:39-19:51, reused in rounds 4 and 5) fitted to the
variants' training steps timed together now (`projects.ablation.plan.fit_to_step_costs`).

Run from the repository root: python -m projects.ablation.rounds.r6_fit_budgets runs/ablation-r6
It reads docs/ablation-data/r5/budgets.json and writes <output>/budgets.json. Each round-3 window fixed its step
count at stage-2 step 56 (8 skipped + 48 timed) with batch 64; those two figures, not stored then, are filled in.
"""
import json
import sys
from pathlib import Path

from projects.ablation import plan as ablation

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
if (out / "budgets.json").exists():
    sys.exit(f"{out / 'budgets.json'} exists: its step counts may already be training; not refitted")
budgets = json.loads(Path("docs/ablation-data/r5/budgets.json").read_text())
for entry in budgets["variants"].values():
    entry.update(fix_step=56, batch_size=64, source="calibration", window_source=entry["source"])
plan = ablation.make_plan(out)
ablation.fit_to_step_costs(plan, budgets, list(ablation.VARIANTS))
for entry in budgets["variants"].values():
    entry["source"] = "round-3 calibration window, fitted to step costs timed together"
    if "window_steps" not in entry:
        sys.exit("the fit did not run")
ablation.save_budgets(out, budgets)
print(json.dumps({v: e["steps"] for v, e in budgets["variants"].items()}))
