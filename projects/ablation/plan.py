"""AMFOR variants with components switched off (or added to a baseline), trained on the same data and seeds for
a fixed per-variant stage-2 step count and evaluated on the test split: what `python -m projects.ablation` does.

Output folder:
    budgets.json                   the settings, and each variant's step count with how it was fixed (machine, date)
    results.jsonl                  one record per finished (variant, seed) run, with its exact amfor.train command
    <variant>/seed<k>/             the `python -m amfor.train` run folder of one seed
    <variant>/seed<k>.console.txt  that run's stdout and stderr (each attempt appended)
    <variant>/seed<k>.commit       the code version its training (last) started from: its record's `commit`
    <variant>/calibration/         the calibration run (stopped once its step count is fixed; no checkpoints kept)

Budgets are step counts, not clocks: a run that stops on the clock depends on how fast the machine happened to
be, so its seed cannot be repeated. Each variant's speed is measured once, by the engine's own BudgetHook (the
first seed's run with `train.max_minutes` set, stopped as soon as the hook has fixed `train.max_steps`); then
every seed runs `train.max_steps=N train.max_minutes=0`, which `python -m amfor.train` repeats exactly.
The calibration windows, taken one variant after another, also read the machine's drift (10-30% within minutes
here): when three or more variants are calibrated before any of their seeds runs, their training steps are timed
together in interleaved rounds (projects.ablation.step_costs) and each window's step time is replaced by a line fitted
through all of them against those costs (`fit_to_step_costs`; budgets.json keeps both).

The variants themselves are in variants.py; the report written from the records, in report.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from amfor.config import ConfigError, build_config, dotted_items, to_dict
from amfor.engine.checkpoint import CheckpointError, load_checkpoint
from amfor.utils.timing import cpu_name

from .process import stop_group
from .report import write_report
from .variants import KNOBS, VARIANTS, check_variants, default_seeds, switch_overrides

logger = logging.getLogger("projects.ablation")


# --- the plan --------------------------------------------------------------------------------------------
# the keys every run's command sets itself (the seed, the budget, the output, the switches)
OWNED_KEYS = ("output", "train.seed", "train.max_steps", "train.max_minutes", *(f"model.kwargs.{s}" for s in KNOBS))


def check_overrides(overrides: Iterable[str]) -> None:
    """The seed, the budget, the output and the switches are the ablation's own: refuse them in --set."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in OWNED_KEYS:
            raise ConfigError(f"--set {key}: the ablation sets this key itself for every run (choose with --seeds, "
                              "--budget-minutes, --steps, --output or --only)")


@dataclass
class Plan:
    """Which runs an ablation holds and how each is trained (everything but the per-variant step count)."""

    output: Path
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    num_seeds: int | None = None        # None = DEFAULT_SEEDS
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    budget_minutes: float | None = None  # calibrated budgets ...
    steps: int | None = None             # ... or one fixed step count for every variant

    def seeds(self, variant: str) -> int:
        return self.num_seeds or default_seeds(variant)

    def settings(self) -> dict:
        """What the results of an output folder depend on (the variants and seeds may grow); `recipe` catches a
        changed default (config file or amfor/config.py) that the arguments alone would not show."""
        return {"config": self.config, "overrides": list(self.overrides), "budget_minutes": self.budget_minutes,
                "steps": self.steps, "recipe": self.recipe()}

    def recipe(self) -> dict:
        """The resolved config of every run as dotted keys, less the keys the ablation sets per run."""
        flat = dotted_items(to_dict(build_config(self.config, self.overrides)))
        return {k: v for k, v in flat.items() if k not in OWNED_KEYS}

    def order(self) -> list[tuple[str, int]]:
        """(variant, seed) pairs seed-major: every variant's seed 0 first, so a cut-short ablation has every row."""
        last = max(self.seeds(v) for v in self.variants)
        return [(v, s) for s in range(last) for v in self.variants if s < self.seeds(v)]

    def run_dir(self, variant: str, seed: int) -> Path:
        return self.output / variant / f"seed{seed}"

    def train_args(self, variant: str, seed: int, steps: int, minutes: float = 0.0,
                   run_dir: Path | None = None) -> list[str]:
        """`python -m amfor.train` arguments of one run: settings, the variant's switches, seed and budget."""
        config = ["--config", self.config] if self.config else []
        switches = switch_overrides(variant)
        budget = [f"train.seed={seed}", f"train.max_steps={steps}", f"train.max_minutes={minutes:g}"]
        out = run_dir if run_dir is not None else self.run_dir(variant, seed)
        return [*config, "--set", *self.overrides, *switches, *budget, "--output", str(out)]

    def ablate_command(self, report: Path, reference_row: str | None = None) -> str:
        """The `python -m projects.ablation` command that reproduces this ablation and its report."""
        args = ["--output", str(self.output)]
        args += ["--config", self.config] if self.config else []
        args += ["--steps", str(self.steps)] if self.steps else ["--budget-minutes", f"{self.budget_minutes:g}"]
        args += ["--only", *self.variants] if self.variants != list(VARIANTS) else []
        args += ["--seeds", str(self.num_seeds)] if self.num_seeds else []
        args += ["--set", *self.overrides] if self.overrides else []
        args += ["--reference", reference_row] if reference_row else []
        return shlex.join(["python", "-m", "projects.ablation", *args, "--report", str(report)])


def make_plan(output: str | Path, only: Iterable[str] | None = None, seeds: int | None = None,
              config: str | None = None, overrides: Iterable[str] = (), budget_minutes: float | None = None,
              steps: int | None = None) -> Plan:
    """A checked plan: known variants, seeds >= 1, overrides that fit the config schema, one kind of budget.
    No budget given: the base config's `train.max_minutes` (the demo's 9 minutes)."""
    variants = check_variants(only) if only else list(VARIANTS)
    overrides = list(overrides)
    if seeds is not None and seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    if budget_minutes is not None and (steps is not None or budget_minutes <= 0):
        raise ConfigError("--budget-minutes must be > 0 and cannot go with --steps")
    check_overrides(overrides)
    base = build_config(config, overrides)  # unknown keys and bad values fail here, before any run
    if steps is None and budget_minutes is None:
        budget_minutes = float(base.train.max_minutes)
        if budget_minutes <= 0:
            raise ConfigError("the base config has no time budget (train.max_minutes=0): give --budget-minutes "
                              "or --steps")
    return Plan(Path(output), variants, seeds, config, overrides, budget_minutes, steps)


def train_command(args: list[str]) -> str:
    return shlex.join(["python", "-m", "amfor.train", *args])


# --- budgets.json ----------------------------------------------------------------------------------------
def machine() -> dict:
    """What a step count was measured on: CPU model and count, torch version and threads, GPU."""
    import torch

    cpu = cpu_name()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "gpu": gpu}


def code_version() -> str | None:
    """The amfor checkout's commit (short hash), "+dirty" when amfor/ has uncommitted changes; None outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "amfor"],
                               capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def load_budgets(output: Path) -> dict:
    path = output / "budgets.json"
    return json.loads(path.read_text()) if path.exists() else {"settings": None, "variants": {}}


def save_budgets(output: Path, budgets: dict) -> None:
    """Written whole to a temporary file, then renamed: an interrupted write leaves the previous file."""
    tmp = output / ".budgets.json.tmp"
    tmp.write_text(json.dumps(budgets, indent=1) + "\n")
    os.replace(tmp, output / "budgets.json")


def check_settings(budgets: dict, plan: Plan) -> None:
    """An output folder holds one ablation: other settings, or the same arguments over other defaults, would mix
    results of different runs."""
    stored = budgets.get("settings")
    if stored is None:
        return
    given = plan.settings()
    if "recipe" not in stored:
        raise ConfigError(f"{plan.output} holds an ablation from before recipes were recorded: its defaults cannot be "
                          "checked against today's; choose another --output")
    diff = {k: (stored.get(k), v) for k, v in given.items() if k != "recipe" and stored.get(k) != v}
    old, new = stored["recipe"], given["recipe"]
    diff |= {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}
    if diff:
        raise ConfigError(f"{plan.output} holds an ablation with other settings (stored, given: {diff}); "
                          "choose another --output")


# --- running amfor.train ---------------------------------------------------------------------------------
class RunFailed(RuntimeError):
    """A training or calibration run that ended with an error; the message names its console file."""


def _failure(what: str, rc: int, console: Path) -> RunFailed:
    lines = [line for line in console.read_text(errors="replace").splitlines() if line.strip()] \
        if console.exists() else []
    tail = "\n    ".join(lines[-3:])
    return RunFailed(f"{what} failed (exit code {rc}); see {console}:\n    {tail}")


def start_train(args: list[str], console: Path) -> subprocess.Popen:
    """`python -m amfor.train args` in its own session (so its loader workers can be stopped with it)."""
    console.parent.mkdir(parents=True, exist_ok=True)
    with open(console, "a") as out:
        out.write(f"\n[{datetime.now():%Y-%m-%d %H:%M:%S}] $ {train_command(args)}\n")
        out.flush()
        return subprocess.Popen([sys.executable, "-m", "amfor.train", *args], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def run_train(args: list[str], console: Path) -> tuple[int, float]:
    """One amfor.train process to its end -> (exit code, wall seconds); stopped too if this process is."""
    t = time.time()
    proc = start_train(args, console)
    try:
        rc = proc.wait()
    finally:
        stop_group(proc)
    return rc, time.time() - t


def read_jsonl(path: Path) -> list[dict]:
    """The complete records of a JSONL file (a line still being written is skipped)."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


# --- calibration -----------------------------------------------------------------------------------------
def prepare_data(plan: Plan) -> None:
    """Build (for synthetic data: generate) the dataset before any calibration, so no budget pays for it."""
    from amfor.engine.build import build_data

    build_data(build_config(plan.config, plan.overrides))


def _wait_for_budget(proc: subprocess.Popen, metrics: Path, poll_s: float = 0.25) -> dict | None:
    """The run's `budget` record (written when BudgetHook fixes max_steps), or None if it ended without one."""
    while True:
        ended = proc.poll() is not None
        record = next((r for r in read_jsonl(metrics) if r.get("type") == "budget"), None)
        if record is not None or ended:
            return record
        time.sleep(poll_s)


def calibrate(plan: Plan, variant: str) -> dict:
    """Fix `variant`'s stage-2 step count on this machine -> its budgets.json entry.

    Seed 0 runs with `train.max_minutes` set and `train.max_steps=0`: the engine's BudgetHook times a window of
    stage-2 steps and one evaluation forward, counts what the run has spent since its process started (imports,
    data, stage 1) and the evaluations still to come, and writes `max_steps` into the run's config.yaml and
    metrics.jsonl. The calibration run is stopped there and seed 0 is trained again with that `max_steps`, so
    that every result is, by construction, a `max_steps` run: what `python -m amfor.train --set ...
    train.max_steps=N` repeats exactly. (A clock-fixed run once differed from its `max_steps` twin because the
    hook's eval-cost probe drew from the global RNG; the probe now draws inside fork_rng, but the ablation does
    not rely on the two coinciding.)
    """
    run_dir, console = plan.output / variant / "calibration", plan.output / variant / "calibration.console.txt"
    shutil.rmtree(run_dir, ignore_errors=True)
    logger.info("%s: calibrating the step count of a %g-minute run", variant, plan.budget_minutes)
    proc = start_train(plan.train_args(variant, 0, 0, plan.budget_minutes, run_dir), console)
    try:
        record = _wait_for_budget(proc, run_dir / "metrics.jsonl")
    finally:
        stop_group(proc)
    if record is None and proc.returncode != 0:
        raise _failure(f"{variant}: calibration", proc.returncode, console)
    if record is None:
        raise RunFailed(f"{variant}: the calibration run ended before its step count was fixed (stage 2 shorter "
                        f"than 10 steps?); raise train.epochs or give --steps; see {console}")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # never resumed
    resolved = build_config(run_dir / "config.yaml").train  # the run's resolved config, max_steps filled in
    if resolved.max_steps != record["max_steps"]:
        raise RunFailed(f"{variant}: calibration logged max_steps {record['max_steps']} but its config.yaml says "
                        f"{resolved.max_steps}; see {console}")
    logger.info("%s: %d stage-2 steps (%.3f s/step)", variant, record["max_steps"], record["step_s"])
    return {"steps": int(record["max_steps"]), "img_s": resolved.batch_size / record["step_s"],
            "step_s": record["step_s"], "eval_s_per_image": record["eval_s_per_image"], "fix_step": record["step"],
            "cap_steps": record.get("cap_steps"), "batch_size": resolved.batch_size,
            "budget_minutes": plan.budget_minutes, "source": "calibration", "calibration_dir": str(run_dir),
            "machine": machine(), "date": f"{datetime.now():%Y-%m-%d %H:%M}"}


# --- step costs: the calibration windows fitted to costs timed together -----------------------------------
COST_ROUNDS = 20  # interleaved rounds of every calibrated variant's training step
MIN_FIT_VARIANTS = 3  # fewer calibrated together: each keeps its own window


def fit_line(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares (a, b) of y = a x + b; through the origin (b = 0) where the free fit has b < 0."""
    n, mx, my = len(x), statistics.fmean(x), statistics.fmean(y)
    sxx = sum((v - mx) ** 2 for v in x)
    a = sum((u - mx) * (v - my) for u, v in zip(x, y, strict=True)) / sxx if sxx > 0 else 0.0
    b = my - a * mx
    if n < 2 or a <= 0 or b < 0:
        a, b = sum(u * v for u, v in zip(x, y, strict=True)) / sum(u * u for u in x), 0.0
    return a, b


def variant_config(plan: Plan, variant: str):
    """The resolved config of `variant`'s runs (the seed-0 run's, less the step budget)."""
    return build_config(plan.config, [*plan.overrides, *switch_overrides(variant)])


def not_started(plan: Plan, variant: str, done: dict) -> bool:
    """No seed of `variant` has finished or begun (a run folder): its step count may still be re-fixed."""
    return (not any(v == variant for v, _ in done)
            and not any(plan.run_dir(variant, s).exists() for s in range(plan.seeds(variant))))


def fit_to_step_costs(plan: Plan, budgets: dict, variants: Iterable[str]) -> None:
    """Re-fix the calibrated step counts of `variants` from step costs timed together.

    `variants`: those whose seeds have not started (`not_started`): a step count some run already trains is never
    changed, and an ablation interrupted between its calibrations and the fit fits when resumed. Each calibration
    window (48 steps of a real run) reads the variant's step time and the machine's speed of that
    minute, which drifts 10-30%. All these variants' training steps are then timed in the same interleaved rounds
    (projects.ablation.step_costs: the model alone, one batch, no loader), which orders them without the drift, and a
    line window_s = a * cost + b through all of them (a: this machine's speed in the real loop, b: the loader's share
    of a step) gives each variant its fitted step time. The time the window left for steps after it is kept, so
    steps = fix_step + (steps - fix_step) * window_s / fitted_s. Fewer than MIN_FIT_VARIANTS: nothing changes."""
    from .step_costs import median_costs, step_costs

    entries = {v: e for v in variants if (e := budgets["variants"].get(v, {})).get("source") == "calibration"
               and "fix_step" in e}
    if len(entries) < MIN_FIT_VARIANTS:
        return
    logger.info("timing the training steps of %d variants together (%d rounds) to fit their calibrations",
                len(entries), COST_ROUNDS)
    cost = median_costs(step_costs({v: variant_config(plan, v) for v in entries}, rounds=COST_ROUNDS))
    window = {v: e["step_s"] for v, e in entries.items()}
    a, b = fit_line([cost[v] for v in entries], [window[v] for v in entries])
    residuals = [window[v] - (a * cost[v] + b) for v in entries]
    for v, e in entries.items():
        fitted = a * cost[v] + b
        steps = e["fix_step"] + int((e["steps"] - e["fix_step"]) * window[v] / fitted)
        steps = min(steps, e["cap_steps"]) if e.get("cap_steps") else steps
        logger.info("%s: %d stage-2 steps (window %.3f s/step, fitted %.3f)", v, steps, window[v], fitted)
        e.update(window_steps=e["steps"], window_step_s=window[v], window_img_s=e["img_s"], step_cost_s=cost[v],
                 step_s=fitted, img_s=e["batch_size"] / fitted, steps=steps, source="calibration, fitted")
    budgets["step_costs"] = {"variants": sorted(entries), "rounds": COST_ROUNDS, "cost_s": cost, "a": a, "b": b,
                             "rms_residual_s": math.sqrt(statistics.fmean(r * r for r in residuals)),
                             "machine": machine(), "date": f"{datetime.now():%Y-%m-%d %H:%M}"}
    save_budgets(plan.output, budgets)


def budget_of(plan: Plan, variant: str, budgets: dict) -> int:
    """The variant's stage-2 step count: stored, else fixed now (--steps or calibration) and stored."""
    entry = budgets["variants"].get(variant)
    if entry is None:
        entry = calibrate(plan, variant) if plan.steps is None else {
            "steps": plan.steps, "source": "--steps", "machine": machine(), "date": f"{datetime.now():%Y-%m-%d %H:%M}"}
        budgets["variants"][variant] = entry
        save_budgets(plan.output, budgets)
    return int(entry["steps"])


# --- one (variant, seed) run -----------------------------------------------------------------------------
def _resumable(run_dir: Path) -> Path | None:
    """The interrupted run's last.pt when it can be read (amfor.train --resume continues it exactly), else None."""
    last = run_dir / "checkpoints" / "last.pt"
    if not last.exists():
        return None
    try:
        load_checkpoint(last)
    except CheckpointError as exc:
        logger.warning("%s: %s; starting the run again", run_dir, exc)
        return None
    return last


def _code_note(run_dir: Path) -> Path:
    """Beside the run folder: the code version its training (last) started from."""
    return run_dir.parent / f"{run_dir.name}.commit"


def run_one(plan: Plan, variant: str, seed: int, steps: int) -> dict:
    """Train (or resume, or just collect) one run -> its results record."""
    run_dir = plan.run_dir(variant, seed)
    console = run_dir.parent / f"{run_dir.name}.console.txt"
    wall_s, resume = None, None
    if not (run_dir / "results.json").exists():
        resume = _resumable(run_dir)
        if resume is None:
            shutil.rmtree(run_dir, ignore_errors=True)  # a start that wrote no checkpoint: begin anew
        logger.info("%s seed %d: %s %d steps", variant, seed, "resuming" if resume else "training", steps)
        # --output: the checkpoint's config names the folder it was written in, which may have moved since
        args = ["--resume", str(resume), "--output", str(run_dir)] if resume else plan.train_args(variant, seed, steps)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        _code_note(run_dir).write_text(f"{code_version() or ''}\n")  # commits made while it trains do not count
        rc, wall_s = run_train(args, console)
        if rc != 0 or not (run_dir / "results.json").exists():
            raise _failure(f"{variant} seed {seed}", rc, console)
    return make_record(plan, variant, seed, steps, wall_s, resume is not None)


def _epochs(metrics: list[dict], steps: int) -> float | None:
    """Stage-2 epochs reached: steps / the steps per epoch of the run's stage-2 schedule record (PK epochs vary by a
    batch or so)."""
    per_epoch = [r["steps_per_epoch"] for r in metrics if r.get("type") == "schedule" and r.get("stage") == 2]
    return steps / per_epoch[-1] if per_epoch and per_epoch[-1] > 0 else None


RERANKED = (("occluded_mAP", "query", "mAP"), ("occluded_R1", "query", "R1"), ("whole_mAP", "query_whole", "mAP"),
            ("whole_R1", "query_whole", "R1"))  # record field, split, metric of the re-ranked rows (when present)


def _started_from(run_dir: Path) -> str | None:
    """The code version the run's training (its last resumed part) started from; the checkout's now for a folder
    trained before the ablation kept that note."""
    note = _code_note(run_dir)
    return (note.read_text().strip() or None) if note.exists() else code_version()


def make_record(plan: Plan, variant: str, seed: int, steps: int, wall_s: float | None, resumed: bool) -> dict:
    """The results.jsonl record of a finished run folder (results.json and metrics.jsonl); `commit`: the code its
    training (last) started from."""
    run_dir = plan.run_dir(variant, seed)
    results = json.loads((run_dir / "results.json").read_text())
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    img_s = [r["img_s"] for r in metrics if r.get("type") == "train" and r.get("stage") == 2 and "img_s" in r]
    val = [r["mAP"] for r in metrics if r.get("type") == "eval" and r.get("split") == "val"]
    curve = [[r["epoch"], r["step"], r["mAP"]] for r in metrics  # [epoch, step, val mAP] per stage-2 evaluation
             if r.get("type") == "eval" and r.get("split") == "val" and r.get("stage") == 2 and "step" in r]
    return {"variant": variant, "seed": seed, "switches": VARIANTS[variant], "steps": steps,
            "epochs": _epochs(metrics, steps), "img_s": statistics.median(img_s) if img_s else None,
            "occluded_mAP": results["query"]["mAP"], "occluded_R1": results["query"]["R1"],
            "whole_mAP": results["query_whole"]["mAP"], "whole_R1": results["query_whole"]["R1"],
            **{f"{name}_rerank": results[f"{split}_rerank"][m] for name, split, m in RERANKED
               if f"{split}_rerank" in results},
            "val_mAP": max(val) if val else None, "val_curve": curve, "wall_s": wall_s, "resumed": resumed,
            "checkpoint": results.get("checkpoint"), "run_dir": str(run_dir),
            "command": train_command(plan.train_args(variant, seed, steps)), "commit": _started_from(run_dir),
            "date": f"{datetime.now():%Y-%m-%d %H:%M}"}


def load_results(output: Path) -> dict[tuple[str, int], dict]:
    return {(r["variant"], r["seed"]): r for r in read_jsonl(output / "results.jsonl")}


def append_result(output: Path, record: dict) -> None:
    with open(output / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


# --- the driver ------------------------------------------------------------------------------------------
def run_ablation(plan: Plan, report: Path | None = None, reference_row: str | None = None) -> list[str]:
    """Every planned (variant, seed) not finished yet, seed-major -> the failures (the other runs go on).
    The report is rewritten after each finished run, so a cut-short ablation leaves a current one.
    reference_row: the report's Δ reference for every other row (`write_report`)."""
    plan.output.mkdir(parents=True, exist_ok=True)
    budgets = load_budgets(plan.output)
    check_settings(budgets, plan)
    budgets["settings"] = plan.settings()
    save_budgets(plan.output, budgets)
    done = load_results(plan.output)
    todo = [(v, s) for v, s in plan.order() if (v, s) not in done]
    if plan.steps is None and any(v not in budgets["variants"] for v, _ in todo):
        prepare_data(plan)
    failures, broken = [], set()
    if plan.steps is None:  # every variant's calibration first, back to back: the machine's speed drifts by the hour
        for variant in dict.fromkeys(v for v, _ in todo):
            try:
                budget_of(plan, variant, budgets)
            except RunFailed as exc:
                broken.add(variant)  # none of its seeds can run
                failures.append(str(exc))
                logger.error("%s", exc)
        fit_to_step_costs(plan, budgets, [v for v in plan.variants if v not in broken and not_started(plan, v, done)])
    for variant, seed in todo:
        if variant in broken:
            continue
        try:
            done[(variant, seed)] = record = run_one(plan, variant, seed, budget_of(plan, variant, budgets))
        except RunFailed as exc:
            failures.append(str(exc))
            logger.error("%s", exc)
            continue
        append_result(plan.output, record)
        logger.info("%s seed %d: occluded mAP %.2f%%, whole-body mAP %.2f%%", variant, seed,
                    100 * record["occluded_mAP"], 100 * record["whole_mAP"])
        if report is not None:
            write_report(plan, list(done.values()), budgets, report, reference_row)
    if report is not None:
        write_report(plan, list(done.values()), budgets, report, reference_row)
    return failures


def stored_plan(plan: Plan) -> Plan:
    """`plan` with the settings its output folder was run with (for a report or listing of that folder)."""
    stored = load_budgets(plan.output).get("settings")
    if stored is None:
        return plan
    return Plan(plan.output, plan.variants, plan.num_seeds, stored["config"], list(stored["overrides"]),
                stored["budget_minutes"], stored["steps"])


def status_lines(plan: Plan) -> list[str]:
    """`--list`: each variant's seeds (done / interrupted / to run) and budget."""
    budgets, done = load_budgets(plan.output), load_results(plan.output)
    lines = [f"{'variant':<16} {'seeds':<6} {'budget':<24} status"]
    for variant in plan.variants:
        n = plan.seeds(variant)
        entry = budgets["variants"].get(variant)
        budget = f"{entry['steps']} steps ({entry['source']})" if entry else \
            f"{plan.steps} steps (--steps)" if plan.steps else f"to calibrate ({plan.budget_minutes:g} min)"
        states = []
        for seed in range(n):
            run_dir = plan.run_dir(variant, seed)
            state = "done" if (variant, seed) in done or (run_dir / "results.json").exists() else \
                "interrupted" if (run_dir / "checkpoints" / "last.pt").exists() else "to run"
            states.append(f"seed {seed} {state}")
        finished = sum(s.endswith("done") for s in states)
        lines.append(f"{variant:<16} {finished}/{n:<4} {budget:<24} {', '.join(states)}")
    return lines
