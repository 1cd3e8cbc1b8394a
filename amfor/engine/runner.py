"""Running a run from a config: stage 1, stage 2, the final evaluation (what `python -m amfor.train` does).

`Run` holds what `amfor.engine.build` builds (data, model, precision, run folder) and drives the stages; `train` is
the whole run. The run folder's contents: amfor/engine/build.py.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from .. import config as C
from ..data import resolve_data_config
from ..data.records import ReIDData
from ..evaluation.protocol import TEST_PAIRS, VAL_PAIRS, evaluate, extract, format_table
from ..utils import distributed as du
from .build import (
    amp_choice,
    build_data,
    build_model,
    count_cameras,
    log_to_file,
    make_run_dir,
    process_start_time,
    remove_made,
    resolve_run_dir,
    setup_logging,
)
from .checkpoint import load_checkpoint, load_model_state, rng_state, save_checkpoint, seed_everything, set_rng_state
from .data import auto_num_workers, build_epoch_loader
from .hooks import BudgetHook, CheckpointHook, EvalHook, LoggerHook, MetricsLog
from .optim import WarmupCosine, build_stage1_optimizer, build_stage2_optimizer
from .trainer import Stage1Trainer, Stage2Trainer

logger = logging.getLogger("amfor.train")


class Stage1Features(torch.nn.Module):
    """`model.stage1_features` under extract()'s contract ({"features": [B, D]}). The model is a submodule, so
    extract()'s eval() reaches it (no dropout or drop-path while caching) and its train() afterwards restores the
    model's own mode."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.pretrained_cfg = getattr(model, "pretrained_cfg", None)

    def forward(self, img: torch.Tensor, camid: torch.Tensor, global_only: bool = False) -> dict:
        return {"features": self.model.stage1_features(img, camid)}


class Run:
    """State shared by the stages of one training run."""

    def __init__(self, cfg: DictConfig, resume: dict | None = None, resume_path: Path | None = None,
                 start: float | None = None) -> None:
        self.start = process_start_time() if start is None else start
        self.cfg, self.resume = cfg, resume
        self.device = du.resolve_device(cfg.device)
        du.init_distributed(self.device)
        self.rank, self.world = du.get_rank(), du.get_world_size()
        self.run_dir = resolve_run_dir(cfg, resume_path)
        setup_logging(None, hold=True)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.log, self.made_dir = MetricsLog(None), None  # the folder comes with open_run_dir
        self.amp, self.amp_reason = amp_choice(cfg.train.amp, self.device)
        self.workers = auto_num_workers(cfg.data.num_workers, du.local_world_size())
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def open_run_dir(self) -> None:
        """Create the run folder (once the data and model are built): log.txt, metrics.jsonl, config.yaml."""
        self.made_dir = make_run_dir(self.run_dir)
        log_to_file(self.run_dir)
        self.log = MetricsLog(self.run_dir / "metrics.jsonl" if du.is_main() else None)
        if du.is_main() and self.log.writer is None:
            logger.info('TensorBoard logs off: pip install "amfor[tensorboard]" to have them')
        if self.resume is not None and du.is_main():
            self.log.truncate_after(self.resume["trainer"]["stage"], self.resume["trainer"]["step"])
        self.write_config()

    def discard_run_dir(self) -> None:
        """After a failure: remove the run folder this run created when it holds no record of progress (a training
        step, an evaluation; the schedule record of a stage's start is none) and no checkpoint yet (nothing to read
        or resume)."""
        metrics = self.run_dir / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] \
            if metrics.exists() else []
        if self.made_dir is None or any(r.get("type") != "schedule" for r in records) or \
                any(self.ckpt_dir.glob("*.pt")):
            return
        self.log.close()
        setup_logging(None)  # closes log.txt
        remove_made(self.run_dir, self.made_dir)

    def write_config(self) -> None:
        if du.is_main():
            (self.run_dir / "config.yaml").write_text(C.to_yaml(self.cfg))

    def build(self) -> None:
        self.data = build_data(self.cfg)  # the dataset logs its own summary table
        other = self.cfg.data.test_name and self.cfg.data.test_name != self.cfg.data.name
        self.test_data = build_data(self.cfg, test=True) if other else None
        self.num_cameras = count_cameras(self.cfg, self.data, self.test_data)
        seed_everything(self.cfg.train.seed)  # the same initial weights on every rank (stage 1 runs without DDP)
        self.model = build_model(self.cfg, self.data.num_train_pids, self.num_cameras).to(self.device)
        if hasattr(self.model, "set_train_cameras"):
            self.model.set_train_cameras(self.data.train_cameras)
        seed_everything(self.cfg.train.seed + self.rank)  # then each rank its own stream (dropout, masking)
        self.size = tuple(self.model.input_size)
        self.norm = {k: v for k, v in resolve_data_config(self.model, self.size).items() if k != "size"}
        self.stage1_finished = False
        logger.info("model %s: %d classes, input %s, %.2fM parameters, %d rank(s), device %s, %d loader worker(s)",
                    self.cfg.model.name, self.model.num_classes, self.size,
                    sum(p.numel() for p in self.model.parameters()) / 1e6, self.world, self.device, self.workers)
        logger.info("precision: %s (%s)", "float32" if self.amp is None else str(self.amp).replace("torch.", ""),
                    self.amp_reason)

    # checkpoints ------------------------------------------------------------------------------------
    def meta(self) -> dict:
        return {"config": C.to_dict(self.cfg), "model_name": self.cfg.model.name,
                "num_classes": int(self.model.num_classes), "num_cameras": int(self.num_cameras),
                "stage1_finished": self.stage1_finished}

    def save(self, trainer) -> None:
        """last.pt (+ a numbered copy when train.keep_checkpoints): every rank calls, rank 0 writes."""
        rngs = du.all_gather_object(rng_state())
        tstate = trainer.state_dict()
        if not du.is_main():
            return
        for name, p in self.model.named_parameters():
            if not bool(torch.isfinite(p).all()):
                raise FloatingPointError(f"parameter {name} is not finite: not overwriting the last good checkpoint")
        state = {**self.meta(), "model": self.model.state_dict(), "trainer": tstate, "rng": rngs}
        save_checkpoint(state, self.ckpt_dir / "last.pt")
        keep = self.cfg.train.keep_checkpoints
        if keep > 0:
            save_checkpoint(state, self.ckpt_dir / f"stage{trainer.stage}_step{trainer.step:07d}.pt")
            numbered = sorted(self.ckpt_dir.glob("stage*_step*.pt"))
            for old in numbered[:-keep]:
                old.unlink()

    def save_best(self, trainer, metrics: dict) -> None:
        state = {**self.meta(), "model": self.model.state_dict(), "val": metrics,
                 "trainer": {"stage": trainer.stage, "step": trainer.step, "epoch": trainer.epoch}}
        save_checkpoint(state, self.ckpt_dir / "best.pt")

    def restore_rng(self, stage: int) -> None:
        """Last step before the resumed stage's loop: the RNG states of the moment the checkpoint was taken."""
        if self.resume is not None and self.resume["trainer"]["stage"] == stage:
            rngs = self.resume["rng"]
            set_rng_state(rngs[self.rank % len(rngs)])

    # stage 1 ----------------------------------------------------------------------------------------
    def stage1(self) -> None:
        cfg, model = self.cfg.train, self.model
        done = self.resume is not None and self.resume["trainer"]["stage"] == 2
        if not getattr(model, "has_text", False) or cfg.stage1_epochs == 0 or done:
            return self.finish_stage1()
        feats, pids = self.cache_features()
        bs = cfg.stage1_batch_size or cfg.batch_size
        optimizer = build_stage1_optimizer(model, cfg)
        per_epoch = len(feats) // bs
        scheduler = WarmupCosine(optimizer, cfg.stage1_epochs * per_epoch, round(cfg.stage1_warmup_epochs * per_epoch),
                                 cfg.stage1_warmup_factor, cfg.stage1_min_lr)
        trainer = Stage1Trainer(model, feats, pids, optimizer, scheduler, cfg.stage1_epochs, bs, cfg.seed, self.device,
                                self.amp, cfg.clip_grad)
        trainer.register_hooks([LoggerHook(self.log, cfg.log_every, bs),
                                CheckpointHook(functools.partial(self.save, trainer), cfg.checkpoint_every)])
        if self.resume is not None:
            trainer.load_state_dict(self.resume["trainer"])
        self.restore_rng(1)
        logger.info("stage 1: %d epochs x %d steps (batch %d, Adam lr %g)", cfg.stage1_epochs, per_epoch, bs,
                    cfg.stage1_lr)
        trainer.train()
        self.finish_stage1()

    def cache_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage-1 image features of the un-augmented training images (model in eval mode), once per run: [N, D]
        and pids [N]."""
        t = time.time()
        wrapper = Stage1Features(self.model).train(self.model.training)
        feats = extract(wrapper, self.data.train, self.device, self.size, self.cfg.data.test_batch_size,
                        self.workers, global_only=True, amp_dtype=self.amp)["features"]
        pids = torch.tensor([r.pid for r in self.data.train], device=self.device)
        logger.info("stage 1: cached %d image features in %.1f s", len(feats), time.time() - t)
        return feats, pids

    def finish_stage1(self) -> None:
        self.model.finish_stage1()
        self.stage1_finished = True

    # stage 2 ----------------------------------------------------------------------------------------
    def stage2(self) -> None:
        cfg = self.cfg.train
        model = self.model  # stage 1's parameters were frozen by model.finish_stage1()
        if self.resume is not None and self.resume["trainer"]["stage"] == 2:
            load_model_state(model, self.resume, "resumed checkpoint")
        loader = build_epoch_loader(self.data, self.cfg, self.size, self.rank, self.world, self.workers, self.norm)
        per_epoch = loader.epoch_length(0)
        total = cfg.max_steps or loader.steps_for_epochs(cfg.epochs)
        train_model = self.wrap_ddp(model)
        optimizer = build_stage2_optimizer(model, cfg)
        scheduler = WarmupCosine(optimizer, total, round(cfg.warmup_epochs * per_epoch), cfg.warmup_factor, cfg.min_lr)
        trainer = Stage2Trainer(train_model, loader, optimizer, scheduler, total, self.device, self.amp, cfg.clip_grad,
                                self.cfg.data.load_masks)
        hooks = []
        if cfg.max_minutes > 0 and cfg.max_steps == 0:
            hooks.append(self.budget_hook(trainer, per_epoch))
        hooks.append(LoggerHook(self.log, cfg.log_every, cfg.batch_size))
        if cfg.eval_every > 0 and "val_query" in self.data.extra:
            hooks.append(EvalHook(self.validate, cfg.eval_every, functools.partial(self.save_best, trainer), self.log))
        hooks.append(CheckpointHook(functools.partial(self.save, trainer), cfg.checkpoint_every))
        trainer.register_hooks(hooks)
        if self.resume is not None and self.resume["trainer"]["stage"] == 2:
            trainer.load_state_dict(self.resume["trainer"])
            trainer.max_steps = scheduler.total_steps
        self.restore_rng(2)
        logger.info("stage 2: %d steps (%d per epoch, global batch %d, %s lr %g, warm-up %d steps)", trainer.max_steps,
                    per_epoch, cfg.batch_size, type(optimizer).__name__, cfg.lr, scheduler.warmup_steps)
        if trainer.step == 0:  # a resumed run keeps the record of its start
            self.log.write({"type": "schedule", "stage": 2, "step": 0,
                            "steps_per_epoch": per_epoch, "batch_size": cfg.batch_size})
        trainer.train()

    def validate(self) -> dict:
        """The validation metrics (val_query against val_gallery) of the model now."""
        return evaluate(self.model, self.data, VAL_PAIRS, self.cfg, self.device, self.size, amp_dtype=self.amp,
                        num_workers=self.workers, rerank=False).get("val", {})

    def wrap_ddp(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.world == 1:
            return model
        has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
        if has_bn and self.cfg.train.sync_bn and self.device.type == "cuda":
            self.model = model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif has_bn:
            logger.warning("BatchNorm statistics are per process (SyncBatchNorm needs CUDA and train.sync_bn=true)")
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                         find_unused_parameters=self.cfg.train.find_unused_parameters)

    def budget_hook(self, trainer, per_epoch: int) -> BudgetHook:
        return BudgetHook(self.start + 60 * self.cfg.train.max_minutes,
                          functools.partial(self.eval_images, per_epoch=per_epoch),
                          functools.partial(self.budget_fixed, trainer), self.measure_eval)

    def eval_images(self, steps: int, per_epoch: int) -> int:
        """Images the evaluations of a `steps`-step stage 2 read: the validations, then the test."""
        cfg, extra = self.cfg, self.data.extra
        flip = 2 if cfg.test.flip else 1
        val = len(extra.get("val_query", [])) + len(extra.get("val_gallery", []))
        test = sum(len(self.data.splits().get(s, [])) for s in ("query", "query_whole", "gallery"))
        runs = (steps // per_epoch // cfg.train.eval_every + 1) if cfg.train.eval_every > 0 and val else 0
        return flip * (runs * val + test)

    def measure_eval(self) -> float:
        """Seconds per image of an eval-mode forward of a test batch (random images)."""
        model, cfg = self.model, self.cfg
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            # the probe batch is drawn inside fork_rng: a clock-budgeted run stays equal to a max_steps run
            img = torch.randn(cfg.data.test_batch_size, 3, *self.size, device=self.device)
            cam = torch.zeros(len(img), dtype=torch.long, device=self.device)
            t = time.time()
            model(img, cam)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            elapsed = time.time() - t
        model.train()
        return elapsed / len(img)

    def budget_fixed(self, trainer, steps: int, info: dict) -> None:
        """The budget fixed stage 2 at `steps`: into the config (config.yaml), the log and metrics.jsonl."""
        cfg = self.cfg
        cfg.train.max_steps = steps
        self.write_config()
        logger.info("train.max_minutes=%g -> train.max_steps=%d (%.3f s/step over %d steps, %.4f s/eval image, "
                    "%.0f s left)", cfg.train.max_minutes, steps, info["step_s"], info["measured_steps"],
                    info["eval_s_per_image"], info["remaining_s"])
        if du.is_main():
            self.log.write({"type": "budget", "stage": 2, "step": trainer.step, "max_steps": steps, **info})

    # final evaluation -------------------------------------------------------------------------------
    def final_eval(self) -> dict:
        """Test split with the best validation checkpoint when there is one, else the final weights."""
        best = self.ckpt_dir / "best.pt"
        source = "final weights (checkpoints/last.pt)"
        if du.broadcast_object(du.is_main() and best.exists()):
            if du.is_main():  # rank 0 holds the run folder; the other ranks (maybe other nodes) get the weights
                state = load_checkpoint(best, self.device)
                load_model_state(self.model, state, best)
                source = (f"checkpoints/best.pt (val mAP {state['val']['mAP']:.4f} at stage-2 step "
                          f"{state['trainer']['step']})")
            du.broadcast_tensors(self.model.state_dict().values())
        data = self.test_data if self.test_data is not None else self.data
        results = run_test(self.model, self.cfg, self.device, self.size, self.run_dir, self.amp, self.workers, data)
        if du.is_main():
            logger.info("\n%s", format_table(results, f"test ({source})"))
            (self.run_dir / "results.json").write_text(json.dumps({"checkpoint": source, **results}, indent=1))
            flat = {f"{k}/{m}": v[m] for k, v in results.items() for m in ("mAP", "R1", "R5", "R10", "mINP")}
            self.log.write({"type": "test", "stage": 3, "step": 0, "checkpoint": source, **flat})
        return results


def run_test(model, cfg: DictConfig, device, size, out_dir: Path | None, amp=None, workers: int = 1,
             data: ReIDData | None = None) -> dict:
    """Evaluate `model` on the configured test dataset: occluded query and query_whole against the gallery."""
    data = data if data is not None else build_data(cfg, test=True)
    return evaluate(model, data, TEST_PAIRS, cfg, device, size, out_dir, amp_dtype=amp, num_workers=workers)


def train(cfg: DictConfig, resume_path: str | Path | None = None, resume: dict | None = None,
          start: float | None = None) -> dict:
    """The whole run -> test metrics. `resume_path`: a checkpoint to continue exactly (its config is `cfg`'s
    base); `start`: the wall-clock time the budget counts from (default: when this process started)."""
    if resume_path is not None and resume is None:
        resume = load_checkpoint(resume_path)
    run = Run(cfg, resume, Path(resume_path) if resume_path is not None else None, start)
    try:
        run.build()
        run.open_run_dir()
        if resume is not None and resume["trainer"]["stage"] == 1:
            load_model_state(run.model, resume, resume_path)
        run.stage1()
        run.stage2()
        results = run.final_eval()
        logger.info("run folder: %s", run.run_dir)
        du.barrier()  # leave the process group together (gloo aborts a rank that leaves while others still work)
        return results
    except BaseException:
        run.discard_run_dir()
        raise
    finally:
        run.log.close()
        du.cleanup()
