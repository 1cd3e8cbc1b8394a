"""amfor.engine.trainer / hooks / runner, in process on the stand-in: hook order, the loop position, NaN stop,
the time budget, outputs of a run."""

from __future__ import annotations

import json
import time

import pytest
import torch
from cli_runs import load_weights, read_jsonl, standin_overrides

from amfor.config import build_config
from amfor.engine import HookBase, NonFiniteLossError, TrainerBase, load_checkpoint, train


class Recorder(HookBase):
    def __init__(self):
        self.calls = []

    def before_train(self):
        self.calls.append(("before_train", self.trainer.step))

    def before_epoch(self):
        self.calls.append(("before_epoch", self.trainer.epoch, self.trainer.batch))

    def after_epoch(self):
        self.calls.append(("after_epoch", self.trainer.epoch))

    def after_train(self):
        self.calls.append(("after_train", self.trainer.step))


class Counting(TrainerBase):
    def __init__(self, max_steps, hooks):
        super().__init__(2, max_steps, lambda e: 3 if e % 2 == 0 else 2, torch.device("cpu"), hooks)
        self.seen = []

    def start_epoch(self):
        pass

    def run_step(self):
        self.seen.append((self.step, self.epoch, self.batch))
        self.record({"loss": torch.tensor(1.0 * self.step), "acc": torch.tensor(0.5)})


def test_loop_positions_and_hook_order_with_uneven_epochs():
    rec = Recorder()
    t = Counting(7, [rec])
    t.train()
    assert t.seen == [(0, 0, 0), (1, 0, 1), (2, 0, 2), (3, 1, 0), (4, 1, 1), (5, 2, 0), (6, 2, 1)]
    assert rec.calls == [("before_train", 0), ("before_epoch", 0, 0), ("after_epoch", 1), ("before_epoch", 1, 0),
                         ("after_epoch", 2), ("before_epoch", 2, 0), ("after_train", 7)]
    assert t.pop_window() == {"loss": pytest.approx(3.0), "acc": pytest.approx(0.5)}


def test_a_resumed_trainer_starts_mid_epoch():
    rec = Recorder()
    t = Counting(7, [rec])
    t.load_position({"step": 4, "epoch": 1, "batch": 1})
    t.train()
    assert t.seen == [(4, 1, 1), (5, 2, 0), (6, 2, 1)]
    assert rec.calls[1] == ("before_epoch", 1, 1)


def test_non_finite_term_is_named():
    class Bad(Counting):
        def run_step(self):
            self.record({"loss": torch.tensor(float("nan")), "loss_tri": torch.tensor(float("inf")),
                         "loss_id": torch.tensor(1.0)})

    with pytest.raises(NonFiniteLossError, match=r"loss term 'loss_tri' was inf at step 1 of stage 2"):
        Bad(5, []).train()


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_root, tmp_path):
    """The stand-in's loss_part turns NaN on stage-2 forward 6 (epoch 1, batch 1): last.pt stays at step 4."""
    cfg = build_config(overrides=standin_overrides(tiny_root, **{
        "output": tmp_path / "run", "model.kwargs.nan_at": 6, "model.kwargs.nan_term": "loss_part",
        "train.eval_every": 0}))
    with pytest.raises(NonFiniteLossError, match=r"loss term 'loss_part' was nan at step 6 of stage 2"):
        train(cfg)
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert (state["trainer"]["stage"], state["trainer"]["step"]) == (2, 4)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    steps = [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl", "train") if r["stage"] == 2]
    assert steps == [1, 2, 3, 4, 5]  # nothing logged from the NaN step on


def test_a_run_writes_config_log_checkpoints_results_and_pictures(tiny_root, tmp_path):
    out = tmp_path / "run"
    cfg = build_config(overrides=standin_overrides(tiny_root, **{"output": out, "test.num_ranked": 4}))
    results = train(cfg)
    assert set(results) == {"query", "query_whole", "query_rerank", "query_whole_rerank"}  # test.rerank: on
    for split in results.values():
        assert 0 <= split["mAP"] <= 1 and 0 <= split["R1"] <= split["R5"] <= split["R10"] <= 1
    names = {p.name for p in out.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "log.txt", "results.json", "cmc.png", "ranked_query.png",
            "ranked_query_whole.png", "checkpoints"} <= names
    assert build_config(out / "config.yaml").train.epochs == 3  # the resolved config reads back
    records = read_jsonl(out / "metrics.jsonl")
    assert {r["stage"] for r in records if r["type"] == "train"} == {1, 2}
    assert [r["epoch"] for r in records if r["type"] == "eval"] == [1, 2, 3]
    last, best = load_checkpoint(out / "checkpoints" / "last.pt"), load_checkpoint(out / "checkpoints" / "best.pt")
    assert last["trainer"]["step"] == last["trainer"]["max_steps"] == 12 and last["stage1_finished"]
    assert last["trainer"]["optimizer"]["state"] and len(last["rng"]) == 1 and "EvalHook" in last["trainer"]["hooks"]
    val = [r for r in records if r["type"] == "eval"]
    assert best["val"]["mAP"] == max(r["mAP"] for r in val)
    assert best["trainer"]["step"] == max(val, key=lambda r: r["mAP"])["step"]  # first best kept on ties
    assert not torch.equal(load_weights(out / "checkpoints" / "last.pt")["text_bank"],
                           torch.zeros_like(last["model"]["text_bank"]))  # finish_stage1 ran before stage 2
    assert json.loads((out / "results.json").read_text())["query"]["mAP"] == results["query"]["mAP"]


def test_existing_run_folder_is_not_overwritten(tiny_root, tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.pt").write_bytes(b"x")
    cfg = build_config(overrides=standin_overrides(tiny_root, output=tmp_path / "run"))
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg)


@pytest.mark.slow
def test_time_budget_becomes_a_fixed_logged_step_count(tiny_root, tmp_path):
    """max_minutes: measured once, written to config.yaml and metrics.jsonl, and the run stops there."""
    out = tmp_path / "run"
    cfg = build_config(overrides=standin_overrides(tiny_root, **{
        "output": out, "train.max_minutes": 0.3, "train.epochs": 10000, "train.eval_every": 0,
        "train.log_every": 50, "model.kwargs.sleep": 0.02}))
    start = time.time()
    train(cfg, start=start)
    assert time.time() - start < 0.3 * 60 + 10
    budget = read_jsonl(out / "metrics.jsonl", "budget")
    assert len(budget) == 1
    steps = budget[0]["max_steps"]
    assert 10 < steps < 10000 * 4 and budget[0]["step_s"] > 0.02
    assert build_config(out / "config.yaml").train.max_steps == steps
    assert load_checkpoint(out / "checkpoints" / "last.pt")["trainer"]["step"] == steps
