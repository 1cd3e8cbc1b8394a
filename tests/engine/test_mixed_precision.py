"""Mixed precision: a real GradScaler on the CPU (float16 autocast) whose forced overflow skips the step and is
counted in the log, a NaN loss that still stops the run, and train.amp=bf16 / fp16 through the command line."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from cli_runs import read_jsonl, run_cli
from torch import nn

from amfor.config import DEMO_SWITCHES, build_config
from amfor.engine import HookBase, LoggerHook, MetricsLog, NonFiniteLossError, Stage1Trainer, WarmupCosine, build

BATCH, PER_EPOCH, EPOCHS = 4, 4, 2  # 8 steps


class Fit(nn.Module):
    """stage1_loss: cross-entropy of a linear layer (float16 under autocast). On the calls in `huge` the loss is
    multiplied by 1e36: finite in float32, but scaled by GradScaler's 2^16 it overflows, and so do the gradients;
    on the calls in `nan` the term loss_fit (and so the loss) is NaN."""

    def __init__(self, huge=(), nan=()) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)
        self.huge, self.nan, self.calls = set(huge), set(nan), 0

    def stage1_loss(self, feats, pids) -> dict:
        self.calls += 1
        fit = F.cross_entropy(self.lin(feats).float(), pids)
        if self.calls in self.huge:
            fit = fit * 1e36
        if self.calls in self.nan:
            fit = fit * float("nan")
        return {"loss": fit, "loss_fit": fit.detach()}


class Weights(HookBase):
    """The model's parameters before training and after each step."""

    def before_train(self) -> None:
        self.seen = [self.copy()]

    def after_step(self) -> None:
        self.seen.append(self.copy())

    def copy(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.trainer.model.parameters()]


def fp16_trainer(model, tmp_path, hooks=()) -> Stage1Trainer:
    """Stage 1 on 16 small features under float16 autocast with clipping, logging every 2 steps to metrics.jsonl."""
    g = torch.Generator().manual_seed(0)
    feats, pids = 0.1 * torch.randn(BATCH * PER_EPOCH, 4, generator=g), torch.arange(BATCH * PER_EPOCH) % 3
    optimizer = torch.optim.SGD([{"params": list(model.parameters()), "base_lr": 0.1}], lr=0.1)
    scheduler = WarmupCosine(optimizer, EPOCHS * PER_EPOCH, 0)
    trainer = Stage1Trainer(model, feats, pids, optimizer, scheduler, EPOCHS, BATCH, 0, torch.device("cpu"),
                            amp_dtype=torch.float16, clip_grad=1.0)
    trainer.register_hooks([LoggerHook(MetricsLog(tmp_path / "metrics.jsonl", tensorboard=False), 2, BATCH), *hooks])
    return trainer


def test_an_fp16_overflow_skips_the_step_and_is_counted(tmp_path, caplog):
    weights = Weights()
    trainer = fp16_trainer(Fit(huge={3}), tmp_path, [weights])
    logging.getLogger("amfor.train").addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="amfor.train"):
            trainer.train()  # before: NonFiniteLossError "the gradient norm was inf at step 3"
    finally:
        logging.getLogger("amfor.train").removeHandler(caplog.handler)
    assert trainer.step == EPOCHS * PER_EPOCH
    moved = [not all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
             for before, after in zip(weights.seen, weights.seen[1:], strict=False)]
    assert moved == [step != 3 for step in range(1, 9)]  # step 3 left the weights alone: GradScaler skipped it
    records = read_jsonl(tmp_path / "metrics.jsonl", "train")
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    assert [r["amp_overflows"] for r in records] == [0, 1, 0, 0]
    initial = torch.amp.GradScaler("cpu").get_scale()
    backoff = torch.amp.GradScaler("cpu").get_backoff_factor()
    assert [r["amp_scale"] for r in records] == [initial] + [initial * backoff] * 3
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in records)  # the skipped step's inf left out
    assert f"step 4: 1 step(s) of the last 2 skipped for an fp16 gradient overflow (loss scale now " \
           f"{initial * backoff:g})" in caplog.text


def test_a_nan_loss_still_stops_an_fp16_run_naming_the_term(tmp_path):
    """An overflow at step 3 is skipped; the NaN loss of step 6 stops the run (before: stopped at step 3)."""
    trainer = fp16_trainer(Fit(huge={3}, nan={6}), tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"loss term 'loss_fit' was nan at step 6 of stage 1"):
        trainer.train()


def test_a_grad_norm_window_averages_the_steps_that_were_taken(tmp_path):
    """A window of two steps, one skipped: its grad_norm is the other step's (here: the same run logged every step)."""
    every = tmp_path / "every"
    every.mkdir()
    one = fp16_trainer(Fit(huge={3}), every)
    one.hooks[0].every = 1
    one.train()
    per_step = read_jsonl(every / "metrics.jsonl", "train")
    assert "grad_norm" not in per_step[2] and per_step[2]["amp_overflows"] == 1  # a window of the skipped step alone
    fp16_trainer(Fit(huge={3}), tmp_path).train()
    pairs = read_jsonl(tmp_path / "metrics.jsonl", "train")
    assert pairs[1]["grad_norm"] == pytest.approx(per_step[3]["grad_norm"])
    assert pairs[0]["grad_norm"] == pytest.approx((per_step[0]["grad_norm"] + per_step[1]["grad_norm"]) / 2)


@pytest.mark.slow
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_the_cli_trains_under_autocast_on_the_cpu(amp, tiny_root, tmp_path):
    """python -m amfor.train with train.amp=bf16 / fp16 on the CPU: the tiny model with every component on, one
    stage-1 epoch and 2 stage-2 steps (before: fp16 was refused on a CPU)."""
    out = tmp_path / "run"
    run_cli(["-m", "amfor.train", "--data-root", str(tiny_root), "--output", str(out), "--device", "cpu", "--set",
             "data.size=tiny", "data.num_workers=1", "train.batch_size=8", "train.stage1_epochs=1",
             "train.max_steps=2", "train.max_minutes=0", "train.eval_every=0", "train.log_every=1",
             "test.num_ranked=0", "test.rerank=false", f"train.amp={amp}",
             *[f"model.kwargs.{k}=true" for k in DEMO_SWITCHES]], tmp_path, timeout=900)
    assert build_config(out / "config.yaml").train.amp == amp
    assert f"precision: {'bfloat16' if amp == 'bf16' else 'float16'} (train.amp={amp})" in (out / "log.txt").read_text()
    train = read_jsonl(out / "metrics.jsonl", "train")
    assert {r["stage"] for r in train} == {1, 2} and [r["step"] for r in train if r["stage"] == 2] == [1, 2]
    assert all(math.isfinite(v) for r in train for k, v in r.items() if k.startswith("loss"))
    if amp == "fp16":  # the GradScaler ran: its scale and the skipped steps are in every record
        assert all(r["amp_scale"] > 0 and r["amp_overflows"] in (0, 1) for r in train)
    else:
        assert not any("amp_scale" in r or "amp_overflows" in r for r in train)
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert (state["trainer"]["stage"], state["trainer"]["step"]) == (2, 2)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert read_jsonl(out / "metrics.jsonl", "test")


@pytest.mark.parametrize(("native", "words"), [(False, "no native bf16"), (True, "not yet validated")])
def test_auto_precision_on_the_cpu_is_float32_and_says_why(native, words, monkeypatch):
    """train.amp=auto on the CPU: float32 with or without native bf16, and the reason names which; the explicit
    modes and CUDA's auto are what they were."""
    monkeypatch.setattr(build, "native_bf16", lambda: (native, "native bf16 (amx_bf16)" if native else
                                                       "no native bf16 on this CPU (flags: none)"))
    dtype, reason = build.amp_choice("auto", torch.device("cpu"))
    assert dtype is None and words in reason and ("train.amp=bf16" in reason) == native
    assert build.amp_choice("bf16", torch.device("cpu")) == (torch.bfloat16, "train.amp=bf16")
    assert build.amp_choice("none", torch.device("cpu"))[0] is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert build.amp_choice("auto", torch.device("cuda"))[0] is torch.float16
