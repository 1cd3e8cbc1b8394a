"""Step costs of all 14 ablation variants timed together (today's code, 10 rounds), and the step counts round 3's
calibration windows (reused in rounds 4 and 5) would get when fitted to them. Writes runs/step-costs-whatif.json
(committed as docs/ablation-data/r6/step_costs_check.json; run 2026-12-02 16:04 at 3d7cb78, plain medians:
median_costs normalised each round from 260f593 on)."""
import json
import sys
from pathlib import Path

from projects.ablation import plan as ablation
from projects.ablation.step_costs import median_costs, step_costs

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 10
plan = ablation.make_plan("runs/unused")
budgets = json.loads(Path("docs/ablation-data/r5/budgets.json").read_text())["variants"]
variants = list(ablation.VARIANTS)
times = step_costs({v: ablation.variant_config(plan, v) for v in variants}, rounds=rounds)
cost = median_costs(times)
window = {v: budgets[v]["step_s"] for v in variants}
a, b = ablation.fit_line([cost[v] for v in variants], [window[v] for v in variants])
rows = {}
for v in variants:
    fitted = a * cost[v] + b
    steps = 56 + int((budgets[v]["steps"] - 56) * window[v] / fitted)
    rows[v] = {"cost_s": cost[v], "window_s": window[v], "fitted_s": fitted, "steps_round4": budgets[v]["steps"],
               "steps_fitted": steps, "times": times[v]}
    print(f"{v:16s} cost {1e3 * cost[v]:6.1f} ms  window {1e3 * window[v]:6.1f}  fitted {1e3 * fitted:6.1f}  "
          f"steps {budgets[v]['steps']:5d} -> {steps:5d}")
res = [window[v] - (a * cost[v] + b) for v in variants]
print(f"a {a:.3f} b {1e3 * b:.1f} ms rms residual {1e3 * (sum(r * r for r in res) / len(res)) ** 0.5:.1f} ms")
Path("runs/step-costs-whatif.json").write_text(json.dumps({"rounds": rounds, "a": a, "b": b, "rows": rows}, indent=1))
