"""`python -m projects.ablation`: AMFOR's components added to a baseline and taken out of the full model one at a
time, every variant trained on the same data and seeds for a fixed stage-2 step count; test-split mAP and R1 on
occluded and whole-body queries, mean and spread over seeds, in a Markdown report with a bar chart.

    python -m projects.ablation                           # all variants, the 9-minute budget, runs/ablation
    python -m projects.ablation --only baseline full --seeds 1   # a subset, one seed each
                                                                 # (the report keeps the folder's other rows)
    python -m projects.ablation --list                           # variants, seeds, status, budgets
    python -m projects.ablation --report-only                    # rebuild docs/ablation.md from results.jsonl
    python -m projects.ablation --report-only --reference +parts # every other row's delta against +parts
    python -m projects.ablation --steps 20 --set data.size=tiny  # a fixed step count for every variant

Each variant's step count is calibrated once on this machine (a run with train.max_minutes set, stopped once the
trainer has fixed train.max_steps; every planned variant first, back to back, before any seed trains) and stored
in <output>/budgets.json; every seed then runs
`python -m amfor.train ... train.max_steps=N train.max_minutes=0` (the command is in results.jsonl). Finished
runs are never repeated and interrupted ones are resumed, so the same command continues an ablation.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from amfor.cli import USER_ERRORS
from amfor.cli import report as report_error
from amfor.config import ConfigError

from .plan import load_budgets, load_results, make_plan, run_ablation, status_lines, stored_plan
from .report import check_reference, report_plan, write_report
from .variants import VARIANTS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m projects.ablation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="NAME", help=f"these variants only ({', '.join(VARIANTS)})")
    parser.add_argument("--seeds", type=int, metavar="N", help="seeds per variant (default 3 for baseline and full, "
                        "2 for the others)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--budget-minutes", type=float, metavar="M",
                        help="wall-clock budget of one run, calibrated into steps (default: the config's "
                        "train.max_minutes)")
    budget.add_argument("--steps", type=int, metavar="N", help="stage-2 steps of every run, no calibration")
    parser.add_argument("--config", help="base YAML config of every run (default: the embedded demo)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="extra overrides of every run, e.g. --set data.size=tiny")
    parser.add_argument("--output", default="runs/ablation", help="ablation folder (default runs/ablation)")
    parser.add_argument("--report", default="docs/ablation.md", help="Markdown report; the PNG goes next to it")
    parser.add_argument("--reference", metavar="NAME", help="the row every other row's Δ is taken against "
                        "(default: baseline for the + rows, full for the full- rows)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--report-only", action="store_true", help="no training: the report from results.jsonl")
    mode.add_argument("--list", action="store_true", help="print variants, seeds, status and budgets, and exit")
    return parser.parse_args(argv)


def setup_logging() -> None:
    log = logging.getLogger("projects.ablation")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        plan = make_plan(args.output, args.only, args.seeds, args.config, args.set, args.budget_minutes, args.steps)
        report = Path(args.report)
        if args.list:
            print("\n".join(status_lines(stored_plan(plan))))
            return 0
        records, budgets = list(load_results(plan.output).values()), load_budgets(plan.output)
        if args.report_only:
            if not records:
                raise ConfigError(f"no finished runs in {plan.output / 'results.jsonl'}")
            shown, finished = stored_plan(plan), {r["variant"] for r in records}
            rows = [v for v in report_plan(shown, records, budgets).variants if v in finished]
            check_reference(args.reference, rows, "rows with finished runs")  # its numbers are needed now
            print(write_report(shown, records, budgets, report, args.reference))
            return 0
        check_reference(args.reference, report_plan(plan, records, budgets).variants)  # may still be trained
        failures = run_ablation(plan, report, args.reference)
    except USER_ERRORS as exc:  # a bad config, plan or budget file, a missing dataset or checkpoint: one line, exit 2
        return report_error("projects.ablation", exc)
    except KeyboardInterrupt:
        print("projects.ablation: interrupted; the same command resumes the ablation", file=sys.stderr)
        return 130
    if failures:
        print(f"projects.ablation: {len(failures)} run(s) failed:\n" + "\n".join(failures), file=sys.stderr)
        return 1
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
