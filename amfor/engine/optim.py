"""Optimisers and the learning-rate schedule of docs/spec.md section 7.

Stage 1: Adam over `model.stage1_parameters()`. Stage 2: SGD with momentum over every other trainable
parameter, in up to four groups: biases get `bias_lr_factor` x the learning rate, and the names in
`model.no_weight_decay()` get no weight decay. Both stages: linear warm-up then cosine decay, per step.
The schedule is a pure function of the step, so resuming needs only the step count.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def is_bias(name: str) -> bool:
    return name == "bias" or name.endswith(".bias")


def param_groups(model: nn.Module, lr: float, weight_decay: float, bias_lr_factor: float = 2.0,
                 no_weight_decay: Iterable[str] = (), exclude: Iterable[nn.Parameter] = ()) -> list[dict]:
    """Trainable parameters of `model` (less `exclude`) in groups by (bias?, weight decay?).

    Each group carries `base_lr` (what the schedule scales) and `names` (for logs and tests).
    """
    skip_decay, excluded = set(no_weight_decay), {id(p) for p in exclude}
    unknown = skip_decay - {n for n, _ in model.named_parameters()}
    if unknown:
        raise ValueError(f"no_weight_decay() names parameters the model does not have: {sorted(unknown)[:5]}")
    groups: dict[tuple[bool, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in excluded:
            continue
        bias, decay = is_bias(name), name not in skip_decay
        group = groups.setdefault((bias, decay), {
            "params": [], "names": [], "base_lr": lr * (bias_lr_factor if bias else 1.0),
            "weight_decay": weight_decay if decay else 0.0})
        group["params"].append(p)
        group["names"].append(name)
    if not groups:
        raise ValueError("the model has no trainable parameter for stage 2")
    return [groups[k] for k in sorted(groups)]


def build_stage2_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """`cfg.optimizer` "sgd" (momentum, weight decay: docs/spec.md section 7, for a pretrained backbone) or "adamw"
    (decoupled weight decay: for a backbone trained from scratch, as the synthetic demo's), with the bias /
    no-weight-decay groups; stage-1 parameters excluded."""
    exclude = list(model.stage1_parameters()) if getattr(model, "has_text", False) else []
    groups = param_groups(model, cfg.lr, cfg.weight_decay, cfg.bias_lr_factor, model.no_weight_decay(), exclude)
    for g in groups:
        g["lr"] = g["base_lr"]
    kind = getattr(cfg, "optimizer", "sgd")
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if kind != "sgd":
        raise ValueError(f"train.optimizer must be 'sgd' or 'adamw', got {kind!r}")
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_stage1_optimizer(model: nn.Module, cfg) -> torch.optim.Adam:
    params = [p for p in model.stage1_parameters() if p.requires_grad]
    if not params:
        raise ValueError("model.stage1_parameters() yielded no trainable parameter")
    return torch.optim.Adam([{"params": params, "base_lr": cfg.stage1_lr, "lr": cfg.stage1_lr}],
                            lr=cfg.stage1_lr, weight_decay=cfg.stage1_weight_decay)


class WarmupCosine:
    """lr(step) = base_lr x factor(step): linear from `warmup_factor` to 1 over `warmup_steps`, then cosine
    down to `min_lr` at `total_steps`. `step_to(s)` sets every group's lr for step s (0-based)."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                 warmup_factor: float = 0.1, min_lr: float = 0.0) -> None:
        self.optimizer, self.total_steps, self.warmup_steps = optimizer, int(total_steps), int(warmup_steps)
        self.warmup_factor, self.min_lr = warmup_factor, min_lr

    def lr_at(self, step: int, base_lr: float) -> float:
        if step < self.warmup_steps:
            alpha = step / self.warmup_steps
            return base_lr * (self.warmup_factor + (1.0 - self.warmup_factor) * alpha)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        floor = min(self.min_lr, base_lr)
        return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def step_to(self, step: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step, group["base_lr"])

    def state_dict(self) -> dict:
        return {"total_steps": self.total_steps, "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state: dict) -> None:
        self.total_steps, self.warmup_steps = int(state["total_steps"]), int(state["warmup_steps"])
