"""The ablation's report: per-variant mean and spread over seeds, the deltas against each row's reference, the
equal-length validation curves, and the Markdown page with its PNG chart (`write_report`). Reads an ablation
folder's records (results.jsonl) and budgets (budgets.json); trains nothing.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from amfor.config import ConfigError

from .variants import KNOBS, VARIANTS, check_variants, default_seeds, reference

if TYPE_CHECKING:
    from .plan import Plan

VALIDATION_NOTE = "model choices were made on the validation split only; these are test-split numbers"


# --- the report: what it covers --------------------------------------------------------------------------
def describe_machine(m: dict) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    return f"{m['cpu']}, {m['cpu_count']} CPUs, torch {m['torch']} ({m['threads']} threads){gpu}"


def report_plan(plan: Plan, records: Iterable[dict], budgets: dict) -> Plan:
    """The plan a report of `plan.output` is written for: every variant the folder holds (a finished run or a
    calibration) as well as the planned ones, so a subset run (`--only`) does not drop the others' rows. A
    widened plan takes the default seed counts, and its command (`ablate_command`) is then the one that
    reproduces the whole folder."""
    held = {r["variant"] for r in records} | set(budgets.get("variants", {})) | set(plan.variants)
    variants = [v for v in VARIANTS if v in held]
    if variants == plan.variants:
        return plan
    return dataclasses.replace(plan, variants=variants, num_seeds=None, overrides=list(plan.overrides))


# --- the report: math ------------------------------------------------------------------------------------
METRICS = ("occluded_mAP", "occluded_R1", "whole_mAP", "whole_R1")
EXTRA_METRICS = ("occluded_mAP_rerank", "val_mAP")  # re-ranked (test.rerank) and the model-selection figure


def mean_std(values: Iterable[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); std None below two values, both None for no values."""
    values = [float(v) for v in values]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _mean_of(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def variant_row(variant: str, records: list[dict], planned: int, calibrated_img_s: float | None = None) -> dict:
    """The finished seeds < `planned` of one variant: counts, steps, speed, epochs, mean/std per metric.
    Speed is the calibration's (measured with the machine to itself) where given, else the runs' mean."""
    recs = sorted((r for r in records if r["variant"] == variant and r["seed"] < planned), key=lambda r: r["seed"])
    img_s = calibrated_img_s if calibrated_img_s is not None else _mean_of(recs, "img_s")
    row = {"variant": variant, "done": len(recs), "planned": planned,
           "steps": sorted({r["steps"] for r in recs}), "img_s": img_s, "epochs": _mean_of(recs, "epochs"),
           "commits": sorted({r["commit"] for r in recs if r.get("commit")})}
    for key in METRICS + EXTRA_METRICS:  # the extra ones only where recorded (older records lack the re-ranked)
        row[key], row[key + "_std"] = mean_std(r[key] for r in recs if r.get(key) is not None)
    return row


def delta(row: dict, ref: dict | None) -> dict:
    """Occluded mAP of `row` minus `ref`'s, the seed spread (the larger std) and whether |delta| exceeds it."""
    if ref is None:
        return {"ref": None, "delta": None, "spread": None, "exceeds": None}
    a, b = row["occluded_mAP"], ref["occluded_mAP"]
    d = None if a is None or b is None else a - b
    stds = (row["occluded_mAP_std"], ref["occluded_mAP_std"])
    spread = None if None in stds else max(stds)
    exceeds = None if d is None or spread is None else abs(d) > spread
    return {"ref": ref["variant"], "delta": d, "spread": spread, "exceeds": exceeds}


def check_reference(reference_row: str | None, variants: Iterable[str], what: str = "rows") -> None:
    """`--reference`: a known variant (else ConfigError naming the closest) and one of `variants` (the report's
    `what`)."""
    if reference_row is None:
        return
    check_variants([reference_row])
    variants = list(variants)
    if reference_row not in variants:
        raise ConfigError(f"--reference {reference_row}: not one of the report's {what} ({', '.join(variants)})")


def summarize(records: list[dict], seeds: dict[str, int], budgets: dict | None = None,
              reference_row: str | None = None) -> list[dict]:
    """One row per variant of `seeds` (variant -> planned seeds), in order, with its delta vs its reference:
    `reference_row` for every other row where given (checked by the CLI, `check_reference`), else each variant's
    own (`reference`). A reference outside `seeds` is computed from the records with its default seed count. With
    `budgets` (budgets.json), a variant's images/s is its calibration's."""
    calibrated = {v: e.get("img_s") for v, e in (budgets or {}).get("variants", {}).items()}

    def row_of(v: str, n: int) -> dict:
        return variant_row(v, records, n, calibrated.get(v))

    rows = {v: row_of(v, n) for v, n in seeds.items()}
    for row in list(rows.values()):
        ref = reference_row or reference(row["variant"])
        ref = None if ref == row["variant"] else ref
        if ref is not None and ref not in rows:
            rows[ref] = row_of(ref, default_seeds(ref))
        row.update(delta(row, rows.get(ref)))
    return [rows[v] for v in seeds]


def curve_rows(records: list[dict], seeds: dict[str, int]) -> tuple[list[tuple[int, int]], list[dict]]:
    """Validation mAP at equal training lengths, from each record's `val_curve` ([epoch, step, mAP] per stage-2
    evaluation). Evaluations are matched by epoch (a PK epoch's length varies by a step or so between runs) ->
    (the (epoch, median step) every curve reached before its own last evaluation, one row per variant of `seeds`
    with a curve: {"variant", "seeds", "at": {epoch: mean val mAP}, "last": mean final val mAP, "last_steps"}).
    Records without a curve (older rounds) are left out."""
    per_variant = {}
    for v, n in seeds.items():
        curves = [r["val_curve"] for r in records if r["variant"] == v and r["seed"] < n and r.get("val_curve")]
        if curves:
            per_variant[v] = curves
    if not per_variant:
        return [], []

    def before_end(curve: list) -> dict[int, tuple[int, float]]:
        end = max(step for _, step, _ in curve)
        return {epoch: (step, m) for epoch, step, m in curve if step < end}

    periodic = {v: [before_end(c) for c in curves] for v, curves in per_variant.items()}
    every = [p for ps in periodic.values() for p in ps]
    epochs = sorted(set.intersection(*(set(p) for p in every)))
    columns = [(e, round(statistics.median(p[e][0] for p in every))) for e in epochs]
    rows = []
    for v, curves in per_variant.items():
        ends = [max(curve, key=lambda x: x[1]) for curve in curves]
        rows.append({"variant": v, "seeds": len(curves),
                     "at": {e: statistics.fmean(p[e][1] for p in periodic[v]) for e in epochs},
                     "last": statistics.fmean(m for _, _, m in ends), "last_steps": sorted({s for _, s, _ in ends})})
    return columns, rows


def curve_lines(columns: list[tuple[int, int]], rows: list[dict]) -> list[str]:
    """The equal-length table (empty without curves): a column per common evaluation, "epoch E (step S)"."""
    if not rows:
        return []
    head = ["variant", "seeds", *(f"epoch {e} (step {s})" for e, s in columns), "last evaluation (step)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["variant"], str(r["seeds"]), *(f"{r['at'][e]:.3f}" for e, _ in columns),
                 f"{r['last']:.3f} ({'/'.join(map(str, r['last_steps']))})"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


CURVE_NOTE = ("Validation mAP at equal training lengths (the periodic evaluations of each run, matched by epoch, "
              "mean over the seeds that logged them; the epochs every run reached before its own end, with the "
              "median step). Each run's learning rate anneals to "
              "its own step count, so at a common step a shorter run is further down its schedule: this view tells "
              "what a component does per step, the table above what it does per unit of time.")


# --- the report: rendering -------------------------------------------------------------------------------
def _pct(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "—"
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def _cell(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def table_lines(rows: list[dict]) -> list[str]:
    """The Markdown table: one row per variant, percentages with 2 decimals, missing seeds shown as such."""
    head = ["variant", "seeds", "steps", "img/s", "epochs", "occluded mAP", "occluded R1", "whole-body mAP",
            "whole-body R1", "Δ occluded mAP", "Δ > seed spread", "occluded mAP re-ranked", "val mAP"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["variant"], f"{r['done']}/{r['planned']} seeds", "/".join(map(str, r["steps"])) or "—",
                 _cell(r["img_s"], ".1f"), _cell(r["epochs"], ".1f"),
                 *(_pct(r[k], r[k + "_std"]) for k in METRICS), *_delta_cells(r),
                 _pct(r["occluded_mAP_rerank"], r["occluded_mAP_rerank_std"]),
                 _cell(r["val_mAP"], ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _delta_cells(row: dict) -> tuple[str, str]:
    """("+1.23 vs baseline", "yes" | "no" | "n/a (< 2 seeds)"), or dashes without a reference or its numbers."""
    if row["delta"] is None:
        return "—", "—"
    beyond = "n/a (< 2 seeds)" if row["exceeds"] is None else "yes" if row["exceeds"] else "no"
    return f"{100 * row['delta']:+.2f} vs {row['ref']}", beyond


def header_lines(plan: Plan, budgets: dict, report: Path, commits: Iterable[str] = (),
                 reference_row: str | None = None) -> list[str]:
    """Budget, machine, code version, reproducing command, date, and the validation/test note."""
    entries = {v: budgets["variants"][v] for v in plan.variants if v in budgets["variants"]}
    steps = ", ".join(f"{v} {e['steps']}" for v, e in entries.items()) or "not fixed yet"
    if plan.steps:
        budget = f"{plan.steps} stage-2 steps for every variant (given with --steps, not calibrated)"
    else:
        budget = (f"{plan.budget_minutes:g} minutes per run (imports, data, stage 1, stage 2 and evaluation), fixed "
                  f"once per variant as a stage-2 step count by calibration on the machine below: {steps}")
        fit = budgets.get("step_costs")
        if fit and any("window_step_s" in e for e in entries.values()):
            budget += (f" (each calibration window's step time replaced by a line through the windows of "
                       f"{len(fit['variants'])} variants against their training steps timed together in "
                       f"{fit['rounds']} interleaved rounds: window = {fit['a']:.3f} x cost + {1e3 * fit['b']:.0f} ms, "
                       f"RMS residual {1e3 * fit['rms_residual_s']:.0f} ms; `budgets.json` keeps both)")
    refs = (f"{reference_row} for every other row, `--reference`" if reference_row else
            "baseline for the `+` rows, full for the `full-` rows")
    machines = sorted({describe_machine(e["machine"]) for e in entries.values() if "machine" in e}) or ["unknown"]
    dates = sorted({e["date"] for e in entries.values() if "date" in e})
    when = f" (step counts fixed {' to '.join(dict.fromkeys([dates[0], dates[-1]]))})" if dates else ""
    commits = sorted(set(commits))
    code = (f" Code: commit {', '.join(f'`{c}`' for c in commits)} (each record's `commit`)." if commits else "")
    return [
        "# AMFOR ablation", "",
        f"Budget: {budget}; every seed of a variant trains exactly that many steps (`train.max_steps=N "
        "train.max_minutes=0`), so each run is repeatable from the `command` of its record in "
        f"`{plan.output / 'results.jsonl'}`. Machine: {'; '.join(machines)}{when}. Reproduce this report with "
        f"`{plan.ablate_command(report, reference_row)}`. Written {datetime.now():%Y-%m-%d %H:%M}.{code}", "",
        f"Note: {VALIDATION_NOTE}.", "",
        "Test-split mAP and rank-1 in percent, mean ± sample standard deviation over the finished seeds "
        "(`train.seed`; the data, `data.seed`, are the same for all); occluded queries (`query`) and their "
        f"whole-body copies (`query_whole`). Δ: occluded mAP minus that of the reference row ({refs}); it "
        "exceeds the seed spread when |Δ| is larger than the larger of the "
        "two standard deviations. Rows with missing seeds show only the finished ones. img/s: stage-2 training "
        "images per second as measured by the variant's calibration, with the machine to itself (each run's own "
        "figure is in its record).", "",
    ]


def switch_lines(variants: list[str]) -> list[str]:
    lines = ["| variant | " + " | ".join(KNOBS) + " |", "|" + "---|" * (len(KNOBS) + 1)]
    for v in variants:
        lines.append(f"| {v} | " + " | ".join("on" if VARIANTS[v][s] else "·" for s in KNOBS) + " |")
    return lines


def plot_rows(rows: list[dict], path: Path) -> Path:
    """Grouped bars of occluded and whole-body mAP per variant, with std error bars (matplotlib's object API)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.75 * len(rows) + 2), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x, width = list(range(len(rows))), 0.38
    for offset, key, label in ((-width / 2, "occluded_mAP", "occluded"), (width / 2, "whole_mAP", "whole body")):
        heights = [math.nan if r[key] is None else 100 * r[key] for r in rows]
        errors = [math.nan if r[key + "_std"] is None else 100 * r[key + "_std"] for r in rows]  # no bar: < 2 seeds
        ax.bar([i + offset for i in x], heights, width, yerr=errors, capsize=3, label=label)
    ax.set_xticks(x, [f"{r['variant']} ({r['done']}/{r['planned']})" for r in rows], rotation=30, ha="right",
                  fontsize=8)
    ax.set_ylabel("test mAP (%)")
    ax.set_title("AMFOR ablation: mean ± std over seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


NOTES_MARKER = "<!-- notes: hand-written below this line, kept when the report is rewritten -->"


def write_report(plan: Plan, records: list[dict], budgets: dict, report: Path,
                 reference_row: str | None = None) -> Path:
    """`report` (Markdown) and the PNG next to it, from the records of finished runs. Whatever follows
    NOTES_MARKER in an existing report (the findings, written by hand) is kept. The report covers every variant
    of the output folder (`report_plan`), whatever subset `plan` trained. reference_row: the variant every other
    row's Δ is taken against (None: baseline for `+` rows, full for `full-` rows)."""
    records = list(records)
    plan = report_plan(plan, records, budgets)
    seeds = {v: plan.seeds(v) for v in plan.variants}
    rows = summarize(records, seeds, budgets, reference_row)
    report.parent.mkdir(parents=True, exist_ok=True)
    png = plot_rows(rows, report.with_suffix(".png"))
    old = report.read_text() if report.exists() else ""
    notes = old[old.index(NOTES_MARKER):] if NOTES_MARKER in old else NOTES_MARKER + "\n"
    commits = (c for r in rows for c in r["commits"])
    columns, curves = curve_rows(records, seeds)
    equal_lengths = [CURVE_NOTE, "", *curve_lines(columns, curves), ""] if curves else []
    lines = [*header_lines(plan, budgets, report, commits, reference_row), *table_lines(rows), "",
             f"![occluded and whole-body mAP]({png.name})", "", *equal_lengths, "Switches (`model.kwargs.<switch>`):",
             "", *switch_lines(plan.variants), ""]
    report.write_text("\n".join(lines) + "\n" + notes.rstrip("\n") + "\n")
    return report
