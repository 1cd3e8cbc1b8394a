"""The training loop (fast-reid's TrainerBase): a short loop over steps calling hooks around each step/epoch.

`TrainerBase.train()` runs steps `step .. max_steps-1`; `(epoch, batch)` is the position of the next
step, so a trainer restored from a checkpoint taken mid-epoch continues at the same batch. Subclasses
define `start_epoch()` (set up the epoch's batches from `batch` on) and `run_step()`:
`Stage1Trainer` (prompt learning on cached image features, Adam) and `Stage2Trainer` (the full model).

Losses are recorded as detached device tensors and checked together (one synchronisation) when a
hook calls `check()`: every step on CPU, at log steps and before checkpoints on GPU. A non-finite term
raises NonFiniteLossError naming it, before anything else is written.

Under float16 autocast the GradScaler overflows on purpose (it starts at 2^16 and doubles every 2,000 steps
until the scaled gradients overflow): such a step is skipped (GradScaler's own behaviour: no optimizer step,
a halved scale) and counted as `amp_overflows` in the log, its infinite gradient norm left out of
`grad_norm`. A NaN or inf loss term still stops the run; without float16 a non-finite gradient norm does too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from ..utils import distributed as du


class NonFiniteLossError(FloatingPointError):
    """A loss term (or the gradient norm) became NaN or inf: the run stops, the last good checkpoint stays."""


class HookBase:
    """Called by the trainer around the loop, each epoch and each step; `self.trainer` is set on registration."""

    trainer: TrainerBase

    def before_train(self) -> None: ...
    def after_train(self) -> None: ...
    def before_epoch(self) -> None: ...
    def after_epoch(self) -> None: ...
    def before_step(self) -> None: ...
    def after_step(self) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


class TrainerBase:
    """Steps with hooks. `epoch_length(e)`: the number of batches of epoch e (PK epochs vary slightly)."""

    def __init__(self, stage: int, max_steps: int, epoch_length: Callable[[int], int], device: torch.device,
                 hooks: Sequence[HookBase] = (), check_every_step: bool | None = None) -> None:
        self.stage, self.max_steps, self.epoch_length, self.device = stage, int(max_steps), epoch_length, device
        self.step = self.epoch = self.batch = 0
        self.hooks: list[HookBase] = []
        self.check_every_step = device.type == "cpu" if check_every_step is None else check_every_step
        self.loss_names: list[str] = []
        self.check_grad_norm = True  # False where a GradScaler skips the steps whose gradients overflow
        self._pending: list[tuple[int, torch.Tensor]] = []
        self._window_sum: torch.Tensor | None = None
        self._window_n = 0
        self.register_hooks(hooks)

    def register_hooks(self, hooks: Iterable[HookBase]) -> None:
        for h in hooks:
            h.trainer = self
            self.hooks.append(h)

    def _call(self, name: str) -> None:
        for h in self.hooks:
            getattr(h, name)()

    def train(self) -> None:
        self._call("before_train")
        fresh_epoch = True
        while self.step < self.max_steps:
            if fresh_epoch:
                self.start_epoch()
                self._call("before_epoch")
            self._call("before_step")
            self.run_step()
            self.step, self.batch = self.step + 1, self.batch + 1
            fresh_epoch = self.batch >= self.epoch_length(self.epoch)
            if fresh_epoch:
                self.epoch, self.batch = self.epoch + 1, 0
            self._call("after_step")
            if fresh_epoch:
                self._call("after_epoch")
        self.check()
        self._call("after_train")

    def start_epoch(self) -> None:
        raise NotImplementedError

    def run_step(self) -> None:
        raise NotImplementedError

    # --- loss bookkeeping ------------------------------------------------------------------------------
    def record(self, values: dict) -> None:
        """Keep this step's scalar values (detached, on device) for the next `check()`."""
        if not self.loss_names:
            scalars = [k for k, v in values.items() if torch.is_tensor(v) and v.dim() == 0]
            self.loss_names = sorted(scalars, key=lambda k: (k != "loss", not k.startswith("loss_"), k))
        zero = torch.zeros((), device=self.device)
        row = torch.stack([values[k].detach().float() if k in values else zero for k in self.loss_names])
        self._pending.append((self.step, row))
        if self.check_every_step:
            self.check()

    def check(self) -> None:
        """Synchronise the recorded values (all ranks together) and raise on a non-finite loss term."""
        if not self._pending or not self.loss_names:
            return
        steps = [s for s, _ in self._pending]
        rows = torch.stack([r for _, r in self._pending])
        self._pending = []
        checked = [i for i, k in enumerate(self.loss_names)
                   if k.startswith("loss") or (k == "grad_norm" and self.check_grad_norm)]
        bad = ~torch.isfinite(rows[:, checked])
        packet = torch.cat([rows.sum(0), bad.any(0).float(), torch.tensor([float(len(steps))], device=rows.device)])
        packet = du.all_reduce_sum(packet)
        k = len(self.loss_names)
        flags = packet[k:k + len(checked)].cpu()
        if bool(flags.any()):
            self._raise_non_finite(steps, rows, checked, bad, flags)
        self._window_sum = packet[:k] if self._window_sum is None else self._window_sum + packet[:k]
        self._window_n += int(packet[-1])

    def _raise_non_finite(self, steps, rows, checked, bad, flags) -> None:
        order = sorted(range(len(checked)), key=lambda j: self.loss_names[checked[j]] in ("loss", "grad_norm"))
        j = next(j for j in order if flags[j] > 0)
        name = self.loss_names[checked[j]]
        where = bad[:, j].nonzero()
        if len(where):
            i = int(where[0])
            at = f"was {float(rows[i, checked[j]])} at step {steps[i] + 1} of stage {self.stage}"
        else:
            at = f"became non-finite on another rank (steps {steps[0] + 1}-{steps[-1] + 1} of stage {self.stage})"
        what = "the gradient norm" if name == "grad_norm" else f"loss term '{name}'"
        raise NonFiniteLossError(f"{what} {at}: stopping; the last good checkpoint is kept")

    def pop_window(self) -> dict[str, float]:
        """Means over ranks and steps of the values checked since the last call; `amp_overflows`: the number of
        steps skipped for an fp16 overflow (the same on every rank), `grad_norm` the mean over the other steps."""
        self.check()
        if self._window_sum is None or self._window_n == 0:
            return {}
        means = dict(zip(self.loss_names, (self._window_sum / self._window_n).tolist(), strict=True))
        steps = self._window_n / du.get_world_size()
        self._window_sum, self._window_n = None, 0
        if "amp_overflows" in means:
            skipped = means["amp_overflows"]  # the share of the window's steps
            means["amp_overflows"] = round(skipped * steps)
            if "grad_norm" in means and skipped > 0:  # recorded as 0 on the skipped steps
                if skipped < 1:
                    means["grad_norm"] /= 1 - skipped
                else:
                    del means["grad_norm"]
        return means

    def state_dict(self) -> dict:
        return {"stage": self.stage, "step": self.step, "epoch": self.epoch, "batch": self.batch,
                "max_steps": self.max_steps}

    def load_position(self, state: dict) -> None:
        self.step, self.epoch, self.batch = int(state["step"]), int(state["epoch"]), int(state["batch"])


class _Optimised(TrainerBase):
    """Shared by both stages: optimiser, schedule, AMP and gradient clipping."""

    def __init__(self, stage, model, optimizer, scheduler, max_steps, epoch_length, device, amp_dtype=None,
                 clip_grad: float = 0.0, hooks=()) -> None:
        super().__init__(stage, max_steps, epoch_length, device, hooks)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.amp_dtype, self.clip_grad = amp_dtype, clip_grad
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        self.check_grad_norm = not self.scaler.is_enabled()
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def optimise(self, loss: torch.Tensor, reduce_grads: bool = False) -> dict:
        """Backward (scaled under fp16), clipping and the optimizer step -> the values to record with the losses:
        grad_norm (when clipping), amp_overflows (under fp16: 1.0 when an overflow made GradScaler skip the step)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if reduce_grads:
            du.all_reduce_mean_(p.grad for p in self.params)
        extra = {}
        if self.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            extra["grad_norm"] = nn.utils.clip_grad_norm_(self.params, self.clip_grad)
        if not self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
            return extra
        scale = self.scaler._scale.clone()  # a device tensor: no host sync (get_scale() would be one)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # update() lowers the scale exactly when the step found an inf/NaN gradient and was skipped
        skipped = (self.scaler._scale < scale).float().reshape(())
        extra["amp_overflows"] = skipped
        if "grad_norm" in extra:
            extra["grad_norm"] = torch.where(skipped > 0, 0.0, extra["grad_norm"])
        return extra

    def state_dict(self) -> dict:
        return {**super().state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "hooks": {type(h).__name__: h.state_dict() for h in self.hooks}}

    def load_state_dict(self, state: dict) -> None:
        self.load_position(state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        for h in self.hooks:
            h.load_state_dict(state.get("hooks", {}).get(type(h).__name__, {}))


class Stage1Trainer(_Optimised):
    """Prompt learning: batches of cached image features [N, D] and their pids; only stage-1 parameters learn.

    Each epoch is a seeded permutation cut into global batches (the partial last one dropped); each rank
    takes its slice and the gradients are averaged over ranks.
    """

    def __init__(self, model, feats: torch.Tensor, pids: torch.Tensor, optimizer, scheduler, epochs: int,
                 batch_size: int, seed: int, device, amp_dtype=None, clip_grad: float = 0.0, hooks=()) -> None:
        self.feats, self.pids, self.global_batch, self.seed = feats, pids, batch_size, seed
        per_epoch = len(feats) // batch_size
        if per_epoch == 0:
            raise ValueError(f"stage 1 needs at least one batch: {len(feats)} images < batch {batch_size}")
        _Optimised.__init__(self, 1, model, optimizer, scheduler, epochs * per_epoch, lambda e: per_epoch, device,
                            amp_dtype, clip_grad, hooks)
        self.per_rank = du.shard(batch_size)

    def start_epoch(self) -> None:
        gen = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        self.perm = torch.randperm(len(self.feats), generator=gen).to(self.feats.device)

    def run_step(self) -> None:
        self.scheduler.step_to(self.step)
        idx = self.perm[self.batch * self.global_batch:(self.batch + 1) * self.global_batch][self.per_rank]
        self.model.train()
        with self.autocast():
            out = self.model.stage1_loss(self.feats[idx], self.pids[idx])
        extra = self.optimise(out["loss"], reduce_grads=du.is_dist())
        self.record({**out, **extra})


def stage2_inputs(batch: dict, device: torch.device, use_masks: bool = True) -> tuple:
    """A loader batch -> the model's training arguments (img, pid, camid, masks, occlusion) on `device`; masks
    None when not used or when no image of the batch has one."""
    nb = device.type == "cuda"
    mask = batch["mask"]
    masks = mask.to(device, non_blocking=nb) if use_masks and bool((mask >= 0).any()) else None
    return (batch["img"].to(device, non_blocking=nb), batch["pid"].to(device, non_blocking=nb),
            batch["camid"].to(device, non_blocking=nb), masks, batch["occlusion"].to(device, non_blocking=nb))


class Stage2Trainer(_Optimised):
    """The full model on augmented PK batches: `model(img, pid, camid, masks=, occlusion=)` -> loss dict."""

    def __init__(self, model, loader, optimizer, scheduler, max_steps: int, device, amp_dtype=None,
                 clip_grad: float = 0.0, use_masks: bool = True, hooks=()) -> None:
        _Optimised.__init__(self, 2, model, optimizer, scheduler, max_steps, loader.epoch_length, device, amp_dtype,
                            clip_grad, hooks)
        self.loader, self.use_masks = loader, use_masks
        self.batch_size = loader.batch_sampler.per_rank * du.get_world_size()

    def train(self) -> None:
        try:
            super().train()
        finally:
            self._iter = None
            self.loader.close()

    def start_epoch(self) -> None:
        self.model.train()
        self._iter = self.loader.epoch_iter(self.epoch, self.batch)

    def run_step(self) -> None:
        self.scheduler.step_to(self.step)
        img, pid, camid, masks, occ = stage2_inputs(next(self._iter), self.device, self.use_masks)
        with self.autocast():
            out = self.model(img, pid, camid, masks=masks, occlusion=occ)
        extra = self.optimise(out["loss"])
        self.record({**out, **extra})
