"""amfor.engine.optim: parameter groups (bias lr x2, no weight decay by name) and the warm-up + cosine schedule."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from standin_model import StandIn

from amfor.engine.optim import WarmupCosine, build_stage1_optimizer, build_stage2_optimizer, param_groups

CFG = SimpleNamespace(lr=0.004, momentum=0.9, weight_decay=1e-4, bias_lr_factor=2.0, stage1_lr=3.5e-4,
                      stage1_weight_decay=1e-4)


def groups_by_name(optimizer) -> dict[str, dict]:
    return {n: g for g in optimizer.param_groups for n in g["names"]}


def test_stage2_groups_bias_lr_and_no_weight_decay():
    model = StandIn(5, 3)
    opt = build_stage2_optimizer(model, CFG)
    by = groups_by_name(opt)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    assert by["embed.weight"]["lr"] == 0.004 and by["embed.weight"]["weight_decay"] == 1e-4
    assert by["embed.bias"]["lr"] == pytest.approx(0.008) and by["embed.bias"]["weight_decay"] == 1e-4
    for name in model.no_weight_decay():
        assert by[name]["weight_decay"] == 0.0 and by[name]["lr"] == 0.004
    # stage-1 parameters are not optimised in stage 2 (the text bank is frozen); everything else is
    assert "prompts" not in by
    assert set(by) == {n for n, _ in model.named_parameters()} - {"prompts"}


def test_unknown_no_weight_decay_name_is_an_error():
    model = StandIn(5, 3)
    with pytest.raises(ValueError, match="does not have"):
        param_groups(model, 0.1, 1e-4, no_weight_decay={"not_a_param"})


def test_stage1_optimises_only_stage1_parameters():
    model = StandIn(5, 3)
    opt = build_stage1_optimizer(model, CFG)
    assert isinstance(opt, torch.optim.Adam)
    assert [p for g in opt.param_groups for p in g["params"]] == [model.prompts]
    assert opt.param_groups[0]["lr"] == 3.5e-4


def test_warmup_cosine_values():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "base_lr": 0.004}, {"params": [], "base_lr": 0.008}], lr=0.004)
    sched = WarmupCosine(opt, total_steps=110, warmup_steps=10, warmup_factor=0.1, min_lr=1e-6)
    lrs = []
    for s in range(110):
        sched.step_to(s)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.0004)                       # warm-up starts at factor x lr
    assert lrs[5] == pytest.approx(0.004 * (0.1 + 0.9 * 0.5))    # linear
    assert lrs[10] == pytest.approx(0.004)                       # peak after warm-up
    assert lrs[60] == pytest.approx(1e-6 + (0.004 - 1e-6) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # cosine decreases monotonically
    sched.step_to(110)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-6) and opt.param_groups[1]["lr"] == pytest.approx(1e-6)
    sched.step_to(10)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.008)    # every group scaled from its own base lr


def test_schedule_state_round_trip():
    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "base_lr": 1.0}], lr=1.0)
    a = WarmupCosine(opt, 100, 7)
    b = WarmupCosine(opt, 1, 0)
    b.load_state_dict(a.state_dict())
    assert [b.lr_at(s, 1.0) for s in range(100)] == [a.lr_at(s, 1.0) for s in range(100)]


def test_stage2_adamw_keeps_the_groups():
    model = StandIn(5, 3)
    cfg = SimpleNamespace(**{**vars(CFG), "optimizer": "adamw"})
    opt = build_stage2_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    assert groups_by_name(opt)["embed.bias"]["lr"] == pytest.approx(0.008)
    with pytest.raises(ValueError, match="train.optimizer must be 'sgd' or 'adamw'"):
        build_stage2_optimizer(model, SimpleNamespace(**{**vars(CFG), "optimizer": "lamb"}))
