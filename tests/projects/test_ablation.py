"""`python -m projects.ablation` end to end on the tiny synthetic set with the real tiny model (2 stage-2 steps a run),
plus the report's math on hand-made records."""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from amfor.models.amfor import AMFOR, SWITCHES
from projects.ablation import plan as ablation
from projects.ablation import report as ablation_report
from projects.ablation.cli import main
from projects.ablation.plan import read_jsonl
from projects.ablation.report import curve_lines, curve_rows, delta, mean_std, summarize, table_lines
from projects.ablation.variants import VARIANTS

VARIANT_PAIR = ["baseline", "+parts"]  # the two cheapest variants (no text tower, so no stage 1)


def tiny_sets(root: Path, *extra: str) -> list[str]:
    """Tiny data, batch 8, one stage-1 epoch; a numbered checkpoint per step (so a mid-run resume can be staged)."""
    return [f"data.root={root}", "data.size=tiny", "data.num_workers=1", "device=cpu", "train.batch_size=8",
            "train.stage1_epochs=1", "train.eval_every=1", "train.log_every=1", "test.num_ranked=0",
            "train.checkpoint_every=1", "train.keep_checkpoints=2", *extra]


def tiny_args(root: Path, out: Path, *flags: str, only: list[str] = VARIANT_PAIR) -> list[str]:
    """`projects.ablation` arguments: `only` x 1 seed on the tiny set, report in the output folder, then `flags`."""
    return ["--only", *only, "--seeds", "1", "--output", str(out), "--report", str(out / "report.md"), *flags,
            "--set", *tiny_sets(root)]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    from amfor.data import build_dataset

    root = tmp_path_factory.mktemp("data")
    build_dataset("synthetic", str(root), size="tiny")
    return root


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The training subprocesses inherit it: two small runs on a shared two-core machine go faster on one thread."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def ablated(tiny_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ablation") / "abl"
    assert main(tiny_args(tiny_root, out, "--steps", "2")) == 0
    return out


def table_of(report: Path) -> list[str]:
    return [line for line in report.read_text().splitlines() if line.startswith("| ")]


# (1) ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_variants_write_records_a_report_and_a_png(ablated):
    records = read_jsonl(ablated / "results.jsonl")
    assert [(r["variant"], r["seed"]) for r in records] == [("baseline", 0), ("+parts", 0)]
    for r in records:
        for key in ("switches", "steps", "epochs", "img_s", "occluded_mAP", "occluded_R1", "whole_mAP", "whole_R1",
                    "val_mAP", "wall_s", "command", "commit"):
            assert r[key] is not None, key
        assert re.fullmatch(r"[0-9a-f]{7,}(\+dirty)?", r["commit"]), r["commit"]
        assert r["switches"] == VARIANTS[r["variant"]] and r["steps"] == 2 and r["epochs"] > 0
        assert 0 <= r["occluded_mAP"] <= 1 and 0 <= r["whole_R1"] <= 1 and not r["resumed"]
        assert r["command"].startswith("python -m amfor.train --set ") and "train.seed=0" in r["command"]
        assert "train.max_steps=2 train.max_minutes=0" in r["command"]
        results = json.loads((ablated / r["variant"] / "seed0" / "results.json").read_text())
        assert r["occluded_mAP"] == results["query"]["mAP"] and r["whole_mAP"] == results["query_whole"]["mAP"]
        assert r["occluded_mAP_rerank"] == results["query_rerank"]["mAP"]  # the default also re-ranks
        steps = [step for _, step, _ in r["val_curve"]]
        assert steps == sorted(steps) and steps[-1] == 2 and max(m for _, _, m in r["val_curve"]) == r["val_mAP"]
    budgets = json.loads((ablated / "budgets.json").read_text())
    assert {v: e["steps"] for v, e in budgets["variants"].items()} == {"baseline": 2, "+parts": 2}
    assert budgets["variants"]["baseline"]["machine"]["cpu_count"] >= 1
    report = (ablated / "report.md").read_text()
    assert "model choices were made on the validation split only; these are test-split numbers" in report
    assert "python -m projects.ablation --output" in report and "--steps 2" in report
    rows = table_of(ablated / "report.md")
    assert rows[1].startswith("| baseline | 1/1 seeds | 2 |") and rows[2].startswith("| +parts | 1/1 seeds | 2 |")
    expected = f"{100 * (records[1]['occluded_mAP'] - records[0]['occluded_mAP']):+.2f} vs baseline"
    assert expected in rows[2] and "n/a (< 2 seeds)" in rows[2]
    assert ablation_report.CURVE_NOTE in report
    curve_table = [line for line in rows if re.match(r"\| \S+ \| 1 \| .* \(2\) \|$", line)]
    assert [line.split(" | ")[0] for line in curve_table] == ["| baseline", "| +parts"]  # one seed, last step 2
    png = (ablated / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


# (2) ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_running_again_trains_nothing(ablated, tiny_root, monkeypatch):
    stamps = {p: p.stat().st_mtime_ns for p in ablated.glob("*/seed0/results.json")}
    lines = (ablated / "results.jsonl").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError(f"a finished ablation started amfor.train {args}")

    monkeypatch.setattr(ablation, "start_train", no_training)
    start = time.time()
    assert main(tiny_args(tiny_root, ablated, "--steps", "2")) == 0
    assert time.time() - start < 15
    assert (ablated / "results.jsonl").read_text() == lines
    assert len(stamps) == 2 and all(p.stat().st_mtime_ns == t for p, t in stamps.items())


@pytest.mark.slow
def test_other_settings_in_the_same_output_are_refused(ablated, tiny_root, capsys):
    assert main(tiny_args(tiny_root, ablated, "--steps", "3")) == 2
    assert "other settings" in capsys.readouterr().err


def test_a_record_names_the_code_its_run_started_from(tmp_path, monkeypatch):
    """A commit made while a run trains does not relabel it; a record collected later (lost, written again) names
    the same code."""
    plan, checkout = ablation.Plan(tmp_path, budget_minutes=9.0), {"version": "aaaaaaa"}
    monkeypatch.setattr(ablation, "code_version", lambda: checkout["version"])

    def fake_train(args, console):
        run_dir = Path(args[args.index("--output") + 1])
        run_dir.mkdir(parents=True)
        checkout["version"] = "bbbbbbb"  # committed while the run trains
        metrics = {"query": {"mAP": 0.5, "R1": 0.5}, "query_whole": {"mAP": 0.6, "R1": 0.7}}
        (run_dir / "results.json").write_text(json.dumps(metrics))
        (run_dir / "metrics.jsonl").write_text("")
        return 0, 1.0

    monkeypatch.setattr(ablation, "run_train", fake_train)
    assert ablation.run_one(plan, "baseline", 0, 2)["commit"] == "aaaaaaa"
    checkout["version"] = "ccccccc"
    assert ablation.run_one(plan, "baseline", 0, 2)["commit"] == "aaaaaaa"  # collected again: no training here
    (tmp_path / "baseline" / "seed0.commit").unlink()  # a folder trained before the note was kept
    assert ablation.run_one(plan, "baseline", 0, 2)["commit"] == "ccccccc"


def test_a_changed_default_is_refused_by_name(tmp_path):
    """The same arguments over another default (here the demo's random erasing) would mix two recipes."""
    from amfor.config import ConfigError

    plan = ablation.Plan(tmp_path, budget_minutes=9.0)
    stored = {"settings": plan.settings(), "variants": {}}
    ablation.check_settings(stored, plan)  # the same recipe: fine
    assert "train.seed" not in stored["settings"]["recipe"] and "model.kwargs.hpr" not in stored["settings"]["recipe"]
    stored["settings"]["recipe"]["data.erasing"] = 0.5 + stored["settings"]["recipe"]["data.erasing"]
    with pytest.raises(ConfigError, match="data.erasing"):
        ablation.check_settings(stored, plan)
    del stored["settings"]["recipe"]
    with pytest.raises(ConfigError, match="before recipes were recorded"):
        ablation.check_settings(stored, plan)


# (3) ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_interrupted_runs_are_resumed_or_restarted_to_the_same_result(ablated, tiny_root, tmp_path):
    out = tmp_path / "abl"
    shutil.copytree(ablated, out)
    before = {r["variant"]: r for r in read_jsonl(out / "results.jsonl")}
    base, parts = out / "baseline" / "seed0", out / "+parts" / "seed0"
    # baseline: killed after stage-2 step 1 (its last.pt is that step's checkpoint); +parts: before any checkpoint
    shutil.copy(base / "checkpoints" / "stage2_step0000001.pt", base / "checkpoints" / "last.pt")
    shutil.rmtree(parts / "checkpoints")
    for run in (base, parts):
        (run / "results.json").unlink()
    (out / "results.jsonl").unlink()
    plan = ablation.make_plan(out, VARIANT_PAIR, 1, overrides=tiny_sets(tiny_root), steps=2)
    lines = "\n".join(ablation.status_lines(plan))
    assert "seed 0 interrupted" in lines and "seed 0 to run" in lines
    assert main(tiny_args(tiny_root, out, "--steps", "2")) == 0
    after = {r["variant"]: r for r in read_jsonl(out / "results.jsonl")}
    assert after["baseline"]["resumed"] and not after["+parts"]["resumed"]
    for v in VARIANT_PAIR:  # an exact resume, and the same command, give the same numbers
        for key in ("occluded_mAP", "occluded_R1", "whole_mAP", "whole_R1", "val_mAP", "steps"):
            assert after[v][key] == before[v][key], (v, key)
    console = (out / "+parts" / "seed0.console.txt").read_text()
    assert console.rsplit("$ ", 1)[1].splitlines()[0] == after["+parts"]["command"]  # the recorded command ran
    assert "--resume" in (out / "baseline" / "seed0.console.txt").read_text().rsplit("$ ", 1)[1].splitlines()[0]


@pytest.mark.slow
def test_a_failing_run_is_reported_and_the_others_go_on(ablated, tiny_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "abl"
    shutil.copytree(ablated, out)
    (out / "results.jsonl").unlink()
    saved = (out / "+parts" / "seed0" / "results.json").read_text()
    for v in VARIANT_PAIR:
        (out / v / "seed0" / "results.json").unlink()

    def fake_train(args, console):  # baseline crashes, +parts finishes (its results.json comes back)
        console.write_text("Traceback (most recent call last):\nRuntimeError: boom\n")
        if args[args.index("--output") + 1].endswith("+parts/seed0"):
            (out / "+parts" / "seed0" / "results.json").write_text(saved)
            return 0, 1.0
        return 1, 1.0

    monkeypatch.setattr(ablation, "run_train", fake_train)
    assert main(tiny_args(tiny_root, out, "--steps", "2")) == 1
    err = capsys.readouterr().err
    assert "baseline seed 0 failed (exit code 1)" in err and "RuntimeError: boom" in err
    assert [r["variant"] for r in read_jsonl(out / "results.jsonl")] == ["+parts"]
    assert "| baseline | 0/1 seeds | — |" in (out / "report.md").read_text()


# (4) ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_report_only_rebuilds_the_same_table(ablated, capsys):
    again = ablated.parent / "again.md"
    assert main(["--report-only", "--only", *VARIANT_PAIR, "--seeds", "1", "--output", str(ablated),
                 "--report", str(again)]) == 0
    assert table_of(again) == table_of(ablated / "report.md") and again.with_suffix(".png").exists()
    assert "--steps 2" in again.read_text()  # the header comes from the stored settings, not the defaults
    again.write_text(again.read_text() + "Findings: written by hand.\n")
    assert main(["--report-only", "--only", *VARIANT_PAIR, "--seeds", "1", "--output", str(ablated),
                 "--report", str(again)]) == 0
    text = again.read_text()
    assert text.endswith(ablation_report.NOTES_MARKER + "\nFindings: written by hand.\n")  # hand-written notes are kept
    assert table_of(again) == table_of(ablated / "report.md") and text.count(ablation_report.NOTES_MARKER) == 1


# (5) ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_an_unknown_variant_exits_2_naming_the_closest(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "projects.ablation", "--only", "full-amf", "--output", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown variant 'full-amf'; did you mean 'full-amff'?" in proc.stderr


def test_bad_input_is_a_clear_error_with_exit_code_2(tmp_path, capsys):
    for argv, message in ((["--seeds", "0"], "--seeds must be >= 1"),
                          (["--steps", "0"], "--steps must be >= 1"),
                          (["--set", "train.seed=3"], "--set train.seed"),
                          (["--set", "train.lrate=3"], "did you mean 'train.lr'"),
                          (["--report-only"], "no finished runs"),
                          (["--only", "+part"], "did you mean '+parts'")):
        assert main([*argv, "--output", str(tmp_path / "x")]) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "x").exists()


def test_an_unreadable_results_file_is_one_line_with_exit_code_2(tmp_path, capsys):
    (tmp_path / "results.jsonl").mkdir()  # an OSError, not a ConfigError: reported as the commands report it
    assert main(["--report-only", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("projects.ablation: error: ") and "results.jsonl" in err and len(err.splitlines()) == 1


# (6) ------------------------------------------------------------------------------------------------------
def record(variant: str, seed: int, occ: float, whole: float = 0.5) -> dict:
    return {"variant": variant, "seed": seed, "steps": 100, "img_s": 10.0 + seed, "epochs": 2.0,
            "occluded_mAP": occ, "occluded_R1": occ + 0.1, "whole_mAP": whole, "whole_R1": whole + 0.1}


def test_report_math_on_hand_made_records():
    records = [record("baseline", 0, 0.20), record("baseline", 1, 0.22), record("baseline", 2, 0.24),
               record("+parts", 0, 0.30), record("+parts", 1, 0.31),
               record("full", 0, 0.40), record("full", 1, 0.40), record("full", 2, 0.40),
               record("full-hpr", 0, 0.395),  # 1 of 2 seeds
               record("full-amgd", 0, 0.39), record("full-amgd", 1, 0.41),
               record("full", 7, 0.99)]  # outside the planned seeds: ignored
    records[0].update(occluded_mAP_rerank=0.30, val_mAP=0.5)  # newer records carry these; older ones lack them
    assert mean_std([0.2, 0.22, 0.24]) == (pytest.approx(0.22), pytest.approx(0.02))
    assert mean_std([0.5]) == (0.5, None) and mean_std([]) == (None, None)
    seeds = {"baseline": 3, "+parts": 2, "full": 3, "full-hpr": 2, "full-amgd": 2, "full-ts": 2}
    rows = {r["variant"]: r for r in summarize(records, seeds)}
    assert list(rows) == list(seeds)
    b, p = rows["baseline"], rows["+parts"]
    assert (b["done"], b["planned"], b["img_s"]) == (3, 3, pytest.approx(11.0)) and b["ref"] is None
    assert p["ref"] == "baseline" and p["delta"] == pytest.approx(0.305 - 0.22)
    assert p["spread"] == pytest.approx(0.02) and p["exceeds"] is True  # std(+parts) = 0.00707 < std(baseline)
    full, hpr, amgd = rows["full"], rows["full-hpr"], rows["full-amgd"]
    assert full["occluded_mAP"] == pytest.approx(0.40) and full["occluded_mAP_std"] == pytest.approx(0.0)
    assert (hpr["done"], hpr["occluded_mAP_std"], hpr["exceeds"]) == (1, None, None)
    assert hpr["delta"] == pytest.approx(-0.005)
    assert amgd["delta"] == pytest.approx(0.0) and amgd["exceeds"] is False
    assert rows["full-ts"]["done"] == 0 and rows["full-ts"]["delta"] is None
    table = {line.split(" | ")[0][2:]: line for line in table_lines(list(rows.values()))[2:]}
    assert "| 3/3 seeds | 100 | 11.0 | 2.0 | 22.00 ± 2.00 | 32.00 ± 2.00 | 50.00 ± 0.00 |" in table["baseline"]
    assert "+8.50 vs baseline | yes |" in table["+parts"]
    assert "| 1/2 seeds |" in table["full-hpr"] and "| 39.50 |" in table["full-hpr"]
    assert "-0.50 vs full | n/a (< 2 seeds) |" in table["full-hpr"]
    assert table["full-ts"].count("—") == 11 and "| 0/2 seeds | — |" in table["full-ts"]
    assert table["baseline"].endswith("| — | 30.00 | 0.500 |")  # re-ranked and val: from the one record with them
    assert delta(rows["full-amgd"], None)["delta"] is None and not math.isnan(amgd["spread"])


def test_report_speed_is_the_calibrations_and_the_commits_are_collected():
    records = [record("baseline", 0, 0.2) | {"commit": "abc1234"}, record("baseline", 1, 0.2) | {"commit": "def5678"},
               record("+parts", 0, 0.3)]
    budgets = {"variants": {"baseline": {"steps": 100, "img_s": 150.0}}}  # +parts: no calibration recorded
    rows = {r["variant"]: r for r in summarize(records, {"baseline": 2, "+parts": 1}, budgets)}
    assert rows["baseline"]["img_s"] == 150.0 and rows["+parts"]["img_s"] == pytest.approx(10.0)
    assert rows["baseline"]["commits"] == ["abc1234", "def5678"] and rows["+parts"]["commits"] == []


def test_variants_respect_the_switch_dependencies():
    assert set(VARIANTS) >= {"baseline", "+camera", "+parts", "+amff", "+hpr", "full", "full-parts", "full-camera"}
    for name, knobs in VARIANTS.items():
        assert list(knobs) == [*SWITCHES, "camera_centering"], name
        AMFOR._check_switches(**{s: knobs[s] for s in SWITCHES}, num_classes=1)
    assert not any(VARIANTS["baseline"].values()) and all(VARIANTS["full"].values())


# calibration ----------------------------------------------------------------------------------------------
def test_every_variant_is_calibrated_back_to_back_before_the_first_run(tmp_path, monkeypatch):
    calls = []

    def calibrate(plan, variant):
        calls.append(("calibrate", variant))
        if variant == "+camera":
            raise ablation.RunFailed("+camera: calibration failed")
        return {"steps": 3, "source": "calibration"}

    def run_one(plan, variant, seed, steps):
        calls.append(("run", variant, seed, steps))
        return {"variant": variant, "seed": seed, "occluded_mAP": 0.1, "whole_mAP": 0.2}

    monkeypatch.setattr(ablation, "calibrate", calibrate)
    monkeypatch.setattr(ablation, "run_one", run_one)
    monkeypatch.setattr(ablation, "prepare_data", lambda plan: None)
    plan = ablation.make_plan(tmp_path / "abl", only=["baseline", "+camera", "+parts"], seeds=2, budget_minutes=1)
    failures = ablation.run_ablation(plan)
    assert calls == [("calibrate", "baseline"), ("calibrate", "+camera"), ("calibrate", "+parts"),
                     ("run", "baseline", 0, 3), ("run", "+parts", 0, 3), ("run", "baseline", 1, 3),
                     ("run", "+parts", 1, 3)]
    assert failures == ["+camera: calibration failed"]
    calls.clear()
    ablation.run_ablation(plan)  # stored budgets and finished runs: only the failed calibration is tried again
    assert calls == [("calibrate", "+camera")]


@pytest.mark.slow
def test_calibration_fixes_a_step_count_that_every_seed_then_runs(tiny_root, tmp_path):
    out = tmp_path / "abl"
    assert main(tiny_args(tiny_root, out, "--budget-minutes", "0.25", only=["baseline"])) == 0
    entry = json.loads((out / "budgets.json").read_text())["variants"]["baseline"]
    assert entry["source"] == "calibration" and entry["steps"] >= 10 and entry["step_s"] > 0
    assert entry["img_s"] == pytest.approx(8 / entry["step_s"]) and entry["machine"]["torch"]
    assert entry["fix_step"] == 8 + 48 and entry["cap_steps"] >= entry["steps"]  # what fit_to_step_costs needs
    assert not (out / "baseline" / "calibration" / "checkpoints").exists()
    (rec,) = read_jsonl(out / "results.jsonl")
    assert rec["steps"] == entry["steps"]
    assert f"train.max_steps={entry['steps']} train.max_minutes=0" in rec["command"]
    from amfor.config import build_config
    cfg = build_config(out / "baseline" / "seed0" / "config.yaml")
    assert (cfg.train.max_steps, cfg.train.max_minutes) == (entry["steps"], 0)
    assert not [r for r in read_jsonl(out / "baseline" / "seed0" / "metrics.jsonl") if r["type"] == "budget"]


def records_folder(out: Path, *results: tuple[str, int, float]) -> Path:
    """An ablation folder (`--steps 5` settings) holding hand-made records of (variant, seed, occluded mAP)."""
    out.mkdir()
    ablation.save_budgets(out, {"settings": ablation.make_plan(out, steps=5).settings(), "variants": {}})
    for variant, seed, occ in results:
        ablation.append_result(out, record(variant, seed, occ))
    return out


def test_a_subset_report_keeps_every_row_of_the_folder(tmp_path):
    """`--only full` over a folder that holds other variants: the report keeps their rows and its command
    names every variant of the folder, not the subset."""
    out = records_folder(tmp_path / "abl", ("baseline", 0, 0.2), ("+parts", 0, 0.3), ("full", 0, 0.4),
                         ("full", 1, 0.42))
    report = tmp_path / "report.md"
    assert main(["--report-only", "--only", "full", "--output", str(out), "--report", str(report)]) == 0
    rows = {line.split(" | ")[0][2:]: line for line in table_of(report)[1:] if " seeds |" in line}
    assert list(rows) == ["baseline", "+parts", "full"]
    assert "| 1/2 seeds |" in rows["+parts"] and "+10.00 vs baseline" in rows["+parts"]
    assert "| 2/3 seeds |" in rows["full"] and "41.00 ± 1.41" in rows["full"]
    command = re.search(r"Reproduce this report with `([^`]*)`", report.read_text()).group(1)
    assert "--steps 5 --only baseline +parts full --report" in command  # default seeds: no --seeds
    # a subset that is all the folder holds stays a subset, with its own seed count
    alone = records_folder(tmp_path / "alone", ("full", 0, 0.4))
    assert main(["--report-only", "--only", "full", "--seeds", "1", "--output", str(alone),
                 "--report", str(report)]) == 0
    assert [line.split(" | ")[:2] for line in table_of(report)[1:] if " seeds |" in line] == [["| full", "1/1 seeds"]]
    assert "--only full --seeds 1" in report.read_text()


def test_a_chosen_reference_row_takes_every_other_rows_delta(tmp_path, capsys):
    """`--reference +parts` over a folder of `+parts` and `full` only (the 30-minute comparison): full's Δ is
    against `+parts`, the header says so and its command reproduces the same table; a reference that is not a row,
    or not a variant, is one line with exit code 2 and writes nothing."""
    out = records_folder(tmp_path / "abl", ("+parts", 0, 0.50), ("+parts", 1, 0.52), ("full", 0, 0.53),
                         ("full", 1, 0.57))
    report = tmp_path / "report.md"
    assert main(["--report-only", "--only", "+parts", "full", "--seeds", "2", "--reference", "+parts",
                 "--output", str(out), "--report", str(report)]) == 0
    rows = {line.split(" | ")[0][2:]: line for line in table_of(report)[1:] if " seeds |" in line}
    assert list(rows) == ["+parts", "full"]
    assert "| +4.00 vs +parts | yes |" in rows["full"]  # 55 - 51; stds 1.41 and 2.83
    assert rows["+parts"].count("| — |") == 2  # the reference row has no Δ of its own
    text = report.read_text()
    assert "reference row (+parts for every other row, `--reference`)" in text
    command = re.search(r"Reproduce this report with `([^`]*)`", text).group(1)
    assert "--reference +parts --report" in command
    before = table_of(report)
    assert main(shlex.split(command)[3:] + ["--report-only"]) == 0
    assert table_of(report) == before
    for reference, message in (("baseline", "--reference baseline: not one of the report's rows with finished "
                                             "runs (+parts, full)"),
                               ("+part", "did you mean '+parts'")):
        capsys.readouterr()
        other = tmp_path / f"other-{reference}.md"
        assert main(["--report-only", "--reference", reference, "--output", str(out), "--report", str(other)]) == 2
        assert message in capsys.readouterr().err and not other.exists()
    fresh = tmp_path / "fresh"  # before any training: nothing is made
    assert main(["--only", "+parts", "full", "--steps", "5", "--reference", "baseline", "--output", str(fresh)]) == 2
    assert "--reference baseline: not one of the report's rows (+parts, full)" in capsys.readouterr().err
    assert not fresh.exists()


def test_the_equal_length_table_averages_the_curves_at_the_epochs_every_run_reached():
    """Val mAP at the evaluations every run made before its own end, matched by epoch (the steps of an epoch vary
    by one between runs), mean over seeds; records without a curve (older rounds) are left out."""
    def curved(variant, seed, curve):
        return record(variant, seed, 0.3) | {"val_curve": curve}
    records = [curved("baseline", 0, [[5, 100, 0.1], [10, 200, 0.2], [15, 300, 0.3], [20, 400, 0.35]]),
               curved("baseline", 1, [[5, 101, 0.3], [10, 201, 0.4], [15, 301, 0.5], [20, 400, 0.45]]),
               curved("full", 0, [[5, 99, 0.2], [10, 199, 0.5], [12, 250, 0.55]]),  # a shorter run: ends at 250
               record("full", 1, 0.3),  # no curve: not counted
               curved("full", 9, [[5, 100, 0.9]])]  # outside the planned seeds
    columns, rows = curve_rows(records, {"baseline": 3, "+parts": 2, "full": 3})
    assert columns == [(5, 100), (10, 200)]  # epoch 15 is past full's end; its epoch-12 evaluation is its last
    base, full = rows
    assert (base["variant"], base["seeds"], full["variant"], full["seeds"]) == ("baseline", 2, "full", 1)
    assert base["at"] == {5: pytest.approx(0.2), 10: pytest.approx(0.3)} and base["last"] == pytest.approx(0.4)
    assert full["at"] == {5: 0.2, 10: 0.5} and full["last"] == 0.55 and full["last_steps"] == [250]
    lines = curve_lines(columns, rows)
    assert lines[0] == "| variant | seeds | epoch 5 (step 100) | epoch 10 (step 200) | last evaluation (step) |"
    assert lines[2] == "| baseline | 2 | 0.200 | 0.300 | 0.400 (400) |"
    assert lines[3] == "| full | 1 | 0.200 | 0.500 | 0.550 (250) |"
    assert curve_rows([record("full", 0, 0.3)], {"full": 3}) == ([], []) and curve_lines([], []) == []


# step costs: the calibration windows fitted to costs timed together ------------------------------------------------
def test_fit_line_recovers_a_line_and_goes_through_the_origin_when_the_intercept_is_negative():
    a, b = ablation.fit_line([0.2, 0.3, 0.5], [0.2 * 1.5 + 0.04, 0.3 * 1.5 + 0.04, 0.5 * 1.5 + 0.04])
    assert (a, b) == (pytest.approx(1.5), pytest.approx(0.04))
    a, b = ablation.fit_line([0.2, 0.3, 0.5], [0.1, 0.3, 0.7])  # free fit: 2.0 x - 0.3
    assert b == 0.0 and a == pytest.approx((0.02 + 0.09 + 0.35) / (0.04 + 0.09 + 0.25))


def test_calibrations_are_fitted_to_step_costs_timed_together_before_any_run(tmp_path, monkeypatch):
    import projects.ablation.step_costs as step_costs

    window = {"baseline": 0.30, "+camera": 0.36, "+parts": 0.40}  # +camera's window read a slow minute
    cost = {"baseline": 0.25, "+camera": 0.25, "+parts": 0.35}
    runs, timed = [], []

    def calibrate(plan, variant):
        return {"steps": 56 + int(100 / window[variant]), "step_s": window[variant], "img_s": 64 / window[variant],
                "fix_step": 56, "cap_steps": 400, "batch_size": 64, "source": "calibration"}

    def fake_costs(configs, rounds):
        timed.append(sorted(configs))
        assert all(c.model.kwargs.parts == (v == "+parts") for v, c in configs.items())  # each variant's switches
        return {v: [cost[v]] * rounds for v in configs}

    monkeypatch.setattr(ablation, "calibrate", calibrate)
    monkeypatch.setattr(step_costs, "step_costs", fake_costs)
    monkeypatch.setattr(ablation, "run_one", lambda plan, v, s, steps: runs.append((v, steps)) or
                        {"variant": v, "seed": s, "occluded_mAP": 0.1, "whole_mAP": 0.2})
    monkeypatch.setattr(ablation, "prepare_data", lambda plan: None)
    plan = ablation.make_plan(tmp_path / "abl", only=list(window), seeds=1, budget_minutes=1)
    assert ablation.run_ablation(plan) == []
    budgets = json.loads((plan.output / "budgets.json").read_text())
    fit = budgets["step_costs"]
    a, b = ablation.fit_line([cost[v] for v in window], [window[v] for v in window])
    assert (fit["a"], fit["b"]) == (pytest.approx(a), pytest.approx(b)) and fit["cost_s"] == cost
    assert timed == [sorted(window)]
    for v, e in budgets["variants"].items():
        fitted = a * cost[v] + b
        assert e["source"] == "calibration, fitted" and e["step_s"] == pytest.approx(fitted)
        assert e["window_step_s"] == window[v] and e["window_steps"] == 56 + int(100 / window[v])
        assert e["steps"] == 56 + int(int(100 / window[v]) * window[v] / fitted)
    # baseline and +camera cost the same, so they get the same steps whatever their windows read
    assert budgets["variants"]["baseline"]["steps"] == budgets["variants"]["+camera"]["steps"]
    assert runs == [(v, budgets["variants"][v]["steps"]) for v in window]
    header = ablation_report.header_lines(plan, budgets, tmp_path / "r.md")[2]
    assert "a line through the windows of 3 variants" in header
    assert f"{ablation.COST_ROUNDS} interleaved rounds" in header
    ablation.run_ablation(plan)  # nothing left to calibrate, fit or run
    assert timed == [sorted(window)] and len(runs) == 3


def test_a_started_variant_keeps_its_step_count(tmp_path, monkeypatch):
    import projects.ablation.step_costs as step_costs

    monkeypatch.setattr(step_costs, "step_costs", lambda configs, rounds: pytest.fail("fitted a started variant"))
    plan = ablation.make_plan(tmp_path / "abl", only=["baseline", "+camera", "+parts"], seeds=1, budget_minutes=1)
    budgets = {"variants": {v: {"steps": 300, "step_s": 0.3, "img_s": 213.0, "fix_step": 56, "batch_size": 64,
                                "source": "calibration"} for v in plan.variants}}
    plan.run_dir("+parts", 0).mkdir(parents=True)  # +parts seed 0 began with 300 steps: the others are too few
    done = {("+camera", 0): {}}
    started = [v for v in plan.variants if not ablation.not_started(plan, v, done)]
    assert started == ["+camera", "+parts"]
    ablation.fit_to_step_costs(plan, budgets, [v for v in plan.variants if v not in started])
    assert "step_costs" not in budgets and budgets["variants"]["baseline"]["steps"] == 300


@pytest.mark.slow
def test_step_costs_time_every_configuration_in_the_same_rounds(tiny_root):
    import torch

    from amfor.engine.build import build_data
    from projects.ablation.step_costs import TrainingStep, median_costs, step_costs, training_batch

    plan = ablation.make_plan("unused", steps=2, overrides=tiny_sets(tiny_root))
    configs = {v: ablation.variant_config(plan, v) for v in ("baseline", "+parts")}
    times = step_costs(configs, rounds=3, warmup=1)
    assert list(times) == ["baseline", "+parts"] and all(len(t) == 3 and min(t) > 0 for t in times.values())
    assert set(median_costs(times)) == {"baseline", "+parts"}
    data = build_data(configs["+parts"])
    batch = training_batch(data, configs["+parts"], (128, 64))
    assert batch["img"].shape == (8, 3, 128, 64) and set(batch) >= {"pid", "camid", "mask", "occlusion"}
    step = TrainingStep(configs["+parts"], data.num_train_pids, data.num_train_cams, batch)
    before = [p.detach().clone() for p in step.model.parameters() if p.requires_grad]
    step()
    after = [p for p in step.model.parameters() if p.requires_grad]
    assert any(not torch.equal(x, y) for x, y in zip(before, after, strict=True))  # the optimiser stepped
    with pytest.raises(ValueError, match="at least one configuration"):
        step_costs({})


def test_median_costs_take_out_each_rounds_machine_speed():
    from projects.ablation.step_costs import median_costs

    # round 2 ran at half the machine's speed, for both configurations alike: b still costs exactly twice a
    cost = median_costs({"a": [1.0, 2.0, 1.1], "b": [2.0, 4.0, 2.2]})
    assert cost["b"] / cost["a"] == pytest.approx(2.0)
    assert cost["a"] == pytest.approx(2.2 ** (1 / 3))  # 1/sqrt(2) of the rounds' mean, sqrt(2) x 2.2^(1/3)
    assert median_costs({"a": [3.0, 1.0, 2.0]}) == {"a": 2.0}
    with pytest.raises(ValueError, match="same number"):
        median_costs({"a": [1.0, 2.0], "b": [1.0]})


def test_a_longer_budget_scales_a_fitted_folder_capped_at_the_epochs(tmp_path, monkeypatch):
    """`fit_round3_windows --scale`: every count times the factor, at most --cap, the old settings dropped (the new
    folder's first run writes its own), the 9-minute count kept; an existing budgets.json is never overwritten."""
    from projects.ablation.rounds import fit_round3_windows

    fitted = tmp_path / "r7"
    fitted.mkdir()
    entries = {"full": {"steps": 614, "source": "fitted"}, "+parts": {"steps": 821, "source": "fitted"}}
    (fitted / "budgets.json").write_text(json.dumps({"settings": {"budget_minutes": 9.0}, "variants": entries}))
    out = tmp_path / "r7-30"
    argv = ["fit_round3_windows", str(out), "--scale", str(fitted), "3.43", "30", "--cap", "2720"]
    monkeypatch.setattr(sys, "argv", argv)
    fit_round3_windows.main()
    budgets = json.loads((out / "budgets.json").read_text())
    assert "settings" not in budgets
    full, parts = budgets["variants"]["full"], budgets["variants"]["+parts"]
    assert (full["steps"], full["steps_9min"], full["budget_minutes"]) == (2106, 614, 30.0)  # round(614 x 3.43)
    assert parts["steps"] == 2720  # round(821 x 3.43) = 2816, past 120 epochs
    assert "x 3.43 for a 30-minute budget" in full["source"]
    with pytest.raises(SystemExit, match="exists"):
        fit_round3_windows.main()
    assert json.loads((out / "budgets.json").read_text()) == budgets
