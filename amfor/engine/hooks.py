"""The trainer's hooks: metrics logging (JSONL, progress bar, TensorBoard), periodic evaluation with the best
checkpoint, periodic checkpoints, and the wall-clock budget turned into a step count."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..utils import distributed as du
from .trainer import HookBase

logger = logging.getLogger("amfor.train")


def _position(line: str) -> tuple[int, int]:
    """(stage, step) of one metrics.jsonl line."""
    record = json.loads(line)
    return record.get("stage", 0), record.get("step", 0)


class MetricsLog:
    """Rank 0's JSONL metrics file (one record a line) and, when the package is installed, TensorBoard."""

    def __init__(self, path: Path | None, tensorboard: bool = True) -> None:
        self.path, self.writer = path, None
        if path is not None and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(path.parent / "tensorboard"))
            except ImportError:
                pass

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            step = record.get("step", 0) + (0 if record.get("stage") == 1 else 10**7)
            prefix = f"{record.get('type', 'train')}/stage{record.get('stage', 0)}"
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch", "stage"):
                    self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def truncate_after(self, stage: int, step: int) -> None:
        """Drop records past (stage, step): what a killed run logged after the checkpoint it resumes from."""
        if self.path is None or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and _position(line) <= (stage, step)]
        self.path.write_text("".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class LoggerHook(HookBase):
    """Every `every` steps: losses (means over the window and ranks), lr, images/s to the log and the bar; under
    fp16 also the loss scale (`amp_scale`) and the steps skipped for a gradient overflow (`amp_overflows`, and a
    log line when there were some)."""

    def __init__(self, log: MetricsLog, every: int, images_per_step: int) -> None:
        self.log, self.every, self.images_per_step = log, every, images_per_step
        self.bar = None

    def before_train(self) -> None:
        t = self.trainer
        self._t, self._s = time.perf_counter(), t.step
        if du.is_main():
            from tqdm import tqdm
            tty = sys.stderr.isatty()
            self.bar = tqdm(total=t.max_steps, initial=t.step, desc=f"stage {t.stage}", dynamic_ncols=True,
                            mininterval=1.0 if tty else 30.0, leave=tty)

    def after_step(self) -> None:
        t = self.trainer
        if self.bar is not None:
            self.bar.total = t.max_steps
            self.bar.update(1)
        if t.step % self.every == 0 or t.step == t.max_steps:
            self.flush()

    def flush(self) -> None:
        t = self.trainer
        values = t.pop_window()
        if not values:
            return
        if t.device.type == "cuda":
            torch.cuda.synchronize(t.device)
        now = time.perf_counter()
        window = t.step - self._s
        img_s = window * self.images_per_step / max(now - self._t, 1e-9)
        self._t, self._s = now, t.step
        lr = min(g["lr"] for g in t.optimizer.param_groups)  # the base lr (biases get bias_lr_factor x)
        record = {"type": "train", "stage": t.stage, "step": t.step, "epoch": t.epoch, "lr": lr, **values,
                  "img_s": img_s}
        scaler = getattr(t, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            record["amp_scale"] = scaler.get_scale()
        if du.is_main():
            self.log.write(record)
            skipped = values.get("amp_overflows", 0)
            if skipped:
                logger.info("stage %d step %d: %d step(s) of the last %d skipped for an fp16 gradient overflow "
                            "(loss scale now %g)", t.stage, t.step, skipped, window, record["amp_scale"])
            if self.bar is not None:
                postfix = {"loss": f"{values.get('loss', math.nan):.4f}", "img/s": f"{img_s:.1f}"}
                self.bar.set_postfix({**postfix, "skipped": skipped} if skipped else postfix, refresh=False)

    def after_train(self) -> None:
        if self.bar is not None:
            self.bar.close()


class CheckpointHook(HookBase):
    """Writes the trainer's state through `save(tag)` every `every` steps (0: at each epoch end) and at the end."""

    def __init__(self, save: Callable[[], None], every: int) -> None:
        self.save, self.every = save, every

    def after_step(self) -> None:
        t = self.trainer
        if self.every > 0 and t.step % self.every == 0 and t.step < t.max_steps:
            t.check()
            self.save()

    def after_epoch(self) -> None:
        t = self.trainer
        if self.every == 0 and t.step < t.max_steps:
            t.check()
            self.save()

    def after_train(self) -> None:
        self.save()


class EvalHook(HookBase):
    """Every `every` epochs: `evaluate()` -> metrics of the validation split; the best mAP saves `save_best()`."""

    def __init__(self, evaluate: Callable[[], dict], every: int, save_best: Callable[[dict], None],
                 log: MetricsLog) -> None:
        self.evaluate, self.every, self.save_best, self.log = evaluate, every, save_best, log
        self.best_map, self.best_step, self.last_step = -1.0, -1, -1

    def _run(self) -> None:
        t = self.trainer
        t.check()
        self.last_step = t.step  # known on every rank (best_* only on rank 0): decides collective work
        metrics = self.evaluate()
        t.model.train()
        if not du.is_main():
            return
        self.log.write({"type": "eval", "split": "val", "stage": t.stage, "step": t.step, "epoch": t.epoch,
                        **metrics})
        logger.info("val at epoch %d (step %d): mAP %.4f R1 %.4f mINP %.4f", t.epoch, t.step, metrics["mAP"],
                    metrics["R1"], metrics["mINP"])
        if metrics["mAP"] > self.best_map:
            self.best_map, self.best_step = metrics["mAP"], t.step
            self.save_best(metrics)

    def after_epoch(self) -> None:
        if self.every > 0 and self.trainer.epoch % self.every == 0:
            self._run()

    def after_train(self) -> None:
        if self.every > 0 and self.last_step != self.trainer.step:
            self._run()

    def state_dict(self) -> dict:
        best = du.broadcast_object((self.best_map, self.best_step))
        return {"best_map": float(best[0]), "best_step": int(best[1])}

    def load_state_dict(self, state: dict) -> None:
        self.best_map, self.best_step = state.get("best_map", -1.0), state.get("best_step", -1)


class BudgetHook(HookBase):
    """Turns a wall-clock budget into a fixed stage-2 step count, once, from measured steps.

    Steps `skip .. skip+measure` of this run are timed (after worker start-up, first-step costs and the batches
    the loader prefetched before stage 2: timing steps 2..10 read 0.65 s/step where the demo then ran 0.78, because
    the first batches were waiting in the queue; the loader, not the model, sets the pace), and an
    eval-mode forward of one training batch gives the evaluation cost per image. Then
    max_steps = min(cap, (budget - elapsed - evaluations - margin) / step time); `on_fixed(steps, info)`
    records it (config, log). Called only when the count is not fixed yet (a resumed run keeps it).

    The window is 48 steps (two PK epochs of the demo): on this two-core machine 20-step stretches of one run
    vary by +-15% (68 to 98 images/s in one `full` run), and a 16-step window once read 1.06 s/step for a demo
    whose stage 2 then ran at 0.85. The margin is 10% of what is left: with 5%, a demo whose window read 0.50
    s/step then ran at 0.62 (the machine slowed down after the window) and took 10 min 7 s of a 9-minute budget.
    """

    def __init__(self, deadline: float, eval_images: Callable[[int], int], on_fixed: Callable[[int, dict], None],
                 measure_eval: Callable[[], float], skip: int = 8, measure: int = 48, margin: float = 0.10,
                 overhead_s: float = 10.0) -> None:
        self.deadline, self.eval_images, self.on_fixed = deadline, eval_images, on_fixed
        self.measure_eval = measure_eval
        self.skip, self.measure, self.margin, self.overhead_s = skip, measure, margin, overhead_s
        self.done, self._t0, self._s0 = False, None, 0

    def _now(self) -> float:
        if self.trainer.device.type == "cuda":
            torch.cuda.synchronize(self.trainer.device)
        return time.time()

    def before_train(self) -> None:
        self._first = self.trainer.step

    def after_step(self) -> None:
        t = self.trainer
        if self.done:
            return
        if t.step == self._first + self.skip:
            self._t0, self._s0 = self._now(), t.step
        elif self._t0 is not None and t.step == self._s0 + self.measure:
            self.fix(t)

    def fix(self, t) -> None:
        now = self._now()
        step_s = (now - self._t0) / (t.step - self._s0)
        eval_s_per_image = self.measure_eval()
        remaining = self.deadline - time.time() - self.overhead_s
        steps = cap = t.max_steps
        for _ in range(3):  # the number of validation runs depends on the steps: iterate to a fixed point
            eval_s = self.eval_images(steps) * eval_s_per_image
            steps = min(t.max_steps, t.step + max(0, int((remaining * (1 - self.margin) - eval_s) / step_s)))
        steps = du.broadcast_object(max(steps, t.step))
        self.done = True
        info = {"step_s": step_s, "eval_s_per_image": eval_s_per_image, "measured_steps": t.step - self._s0,
                "remaining_s": remaining, "cap_steps": cap}
        t.max_steps = steps
        t.scheduler.total_steps = steps
        self.on_fixed(steps, info)
