"""Training-step costs of several model configurations, timed together in one process.

A wall-clock budget becomes a step count through each configuration's step time. One timing window per
configuration, taken minutes apart, reads the machine's drift as much as the configuration: on the shared two-core
VM the same step drifts 10-30% within minutes. Here every configuration takes a stage-2 training step (forward,
backward, optimiser update) in turn, round after round, in reverse order every other round (A B C, C B A, ...), on
the same real training batch, so that a drift reaches every configuration alike; the median over the rounds is the
configuration's cost. `projects.ablation.plan` fits its calibration windows to these costs.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Mapping

import torch
from omegaconf import DictConfig

from amfor.engine.build import amp_dtype, build_data, build_model
from amfor.engine.data import build_epoch_loader
from amfor.engine.optim import build_stage2_optimizer
from amfor.engine.trainer import stage2_inputs
from amfor.utils.timing import interleaved_times


def training_batch(data, cfg: DictConfig, size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The first stage-2 batch of `cfg`'s training loader over `data` (no worker processes): img, pid, camid, mask,
    occlusion."""
    loader = build_epoch_loader(data, cfg, size, rank=0, world=1, num_workers=0)
    try:
        return next(iter(loader.epoch_iter(0, 0)))
    finally:
        loader.close()


class TrainingStep:
    """One configuration's stage-2 training step on a fixed batch, as Stage2Trainer takes it: the model in train
    mode, the stage-1 (text) parameters frozen, the stage-2 optimiser, autocast as `train.amp` says. The batch is
    given here or later (`use_batch`), once the model's input size is known."""

    def __init__(self, cfg: DictConfig, num_classes: int, num_cameras: int,
                 batch: dict[str, torch.Tensor] | None = None) -> None:
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg, num_classes, num_cameras)
        self.model.finish_stage1()  # freezes what stage 1 trains
        self.optimizer = build_stage2_optimizer(self.model, cfg.train)
        dtype = amp_dtype(cfg.train.amp, torch.device("cpu"))
        self.autocast = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype else contextlib.nullcontext
        self.use_masks, self.inputs = cfg.data.load_masks, None
        if batch is not None:
            self.use_batch(batch)

    def use_batch(self, batch: dict[str, torch.Tensor]) -> None:
        self.inputs = stage2_inputs(batch, torch.device("cpu"), self.use_masks)

    def __call__(self) -> None:
        self.model.train()
        with self.autocast():
            loss = self.model(*self.inputs)["loss"]
        if not bool(torch.isfinite(loss)):
            raise FloatingPointError(f"the timed training step gave a non-finite loss ({float(loss)})")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def step_costs(configs: Mapping[str, DictConfig], rounds: int = 10, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per round of each configuration's training step (CPU), all timed in the same rounds.

    configs: name -> resolved config (one dataset for all: the first's). `warmup` untimed steps each first."""
    if not configs:
        raise ValueError("step_costs needs at least one configuration")
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got {rounds} and {warmup}")
    first = next(iter(configs.values()))
    data = build_data(first)
    num_classes, num_cameras = data.num_train_pids, data.num_train_cams
    steps = {name: TrainingStep(cfg, num_classes, num_cameras) for name, cfg in configs.items()}
    batch = training_batch(data, first, tuple(next(iter(steps.values())).model.input_size))
    for step in steps.values():
        step.use_batch(batch)
        for _ in range(warmup):
            step()
    return interleaved_times(steps, rounds)


def median_costs(times: Mapping[str, list[float]]) -> dict[str, float]:
    """name -> its cost in seconds: the median over the rounds of its time divided by that round's geometric mean
    over all the configurations, times the geometric mean of all the times. Dividing by the round's mean takes out
    the machine's speed of that round, which moves every configuration of a round alike (on the two-core VM the
    spread of one configuration's rounds falls by about a third); with one configuration, its median."""
    names = list(times)
    rounds = len(times[names[0]])
    if any(len(ts) != rounds or not rounds for ts in times.values()):
        raise ValueError("median_costs needs the same number (> 0) of rounds for every configuration")
    if len(names) == 1:
        return {names[0]: statistics.median(times[names[0]])}
    per_round = [statistics.geometric_mean([times[n][r] for n in names]) for r in range(rounds)]
    scale = statistics.geometric_mean(per_round)
    return {n: statistics.median(times[n][r] / per_round[r] for r in range(rounds)) * scale for n in names}
