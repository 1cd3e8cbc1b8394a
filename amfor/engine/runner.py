"""A whole run from a config: data, model, stage 1, stage 2, final evaluation (what `python -m amfor.train` does).

Run folder (rank 0 writes): config.yaml (resolved; max_steps filled in when a time budget fixed it),
metrics.jsonl, log.txt, checkpoints/{last,best}.pt, results.json, ranked_*.png and cmc.png. It is created once
the data and the model are built (the log lines before that are written into log.txt then), and a new folder is
removed again when the run fails before its first metrics record, so a failed start leaves nothing behind.
"""

from __future__ import annotations

import importlib
import json
import logging
import logging.handlers
import os
import re
import shutil
import time
from datetime import datetime
from pathlib import Path

import torch
from omegaconf import DictConfig

from .. import config as C
from ..data import build_dataset, resolve_data_config
from ..data.records import ReIDData
from ..extras import require
from . import distributed as du
from .checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model_state,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from .data import auto_num_workers, build_epoch_loader
from .evaluation import TEST_PAIRS, VAL_PAIRS, evaluate, extract, format_table
from .hooks import BudgetHook, CheckpointHook, EvalHook, LoggerHook, MetricsLog
from .optim import WarmupCosine, build_stage1_optimizer, build_stage2_optimizer
from .trainer import Stage1Trainer, Stage2Trainer

logger = logging.getLogger("amfor.train")


class SetupError(RuntimeError):
    """The configured data or model cannot be built: a missing or unreadable dataset, image or weights file, a
    dataset without training identities, a bad dataset or model argument. The message names the file."""


def _setup_error(what: str, exc: Exception) -> SetupError | None:
    """`exc` as a SetupError about `what` when it is the user's problem (files, values, unknown names or keyword
    arguments), else None (a bug: let it raise with its traceback)."""
    if isinstance(exc, TypeError) and "unexpected keyword argument" not in str(exc):
        return None
    if not isinstance(exc, (OSError, ValueError, KeyError, TypeError)):
        return None
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return SetupError(f"{what}: {message}")


# --- building blocks -------------------------------------------------------------------------------------
def process_start_time() -> float:
    """Wall-clock time at which this process started (Linux /proc), else now: budgets count imports too."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def create_model(cfg: DictConfig, num_classes: int, num_cameras: int) -> torch.nn.Module:
    """`amfor.create_model(name, ...)`, or the factory `package.module:function` named by model.name.
    (`model.kwargs.num_cameras` is read by `count_cameras`, not passed twice.)"""
    name = cfg.model.name
    kwargs = {k: v for k, v in cfg.model.kwargs.items() if k != "num_cameras"}
    if ":" in name:
        module, _, attr = name.partition(":")
        factory = getattr(importlib.import_module(module), attr)
    else:
        import amfor
        factory = lambda n, **kw: amfor.create_model(name, n, **kw)  # noqa: E731
    for key, path in (("model.pretrained", cfg.model.pretrained), ("model.kwargs.clip_weights",
                                                                   kwargs.get("clip_weights"))):
        if path and str(path).endswith(".safetensors"):
            require("safetensors", extra="safetensors", purpose=f"{key}={path}")
    try:
        return factory(num_classes, num_cameras=num_cameras, pretrained=cfg.model.pretrained, **kwargs)
    except Exception as exc:
        error = _setup_error(f"model {name}", exc)
        if error is None:
            raise
        raise error from exc


def count_cameras(cfg: DictConfig, *datasets: ReIDData | None) -> int:
    """The model's camera count: `model.kwargs.num_cameras` when the config sets it, else the camera ids of every
    split of every dataset the run sees (0 .. max camid), so that a test camera never seen in training is in
    range (it then gets the seen cameras' mean offsets: docs/model.md, "Cameras")."""
    found = max((d.num_cameras for d in datasets if d is not None), default=0)
    configured = cfg.model.kwargs.get("num_cameras")
    if configured is None:
        return found
    if int(configured) < found:
        raise C.ConfigError(f"model.kwargs.num_cameras={configured}, but the data holds camera ids up to "
                            f"{found - 1}: it must be at least {found}")
    return int(configured)


def build_data(cfg: DictConfig, test: bool = False) -> ReIDData:
    """The configured dataset (rank 0 first, so a synthetic set is generated once), or the test dataset.

    `data.kwargs.on_bad_image=skip` implies `verify_images=true`: unreadable images are dropped (with a warning)
    when the dataset is built; with the default `error` the first unreadable image ends the run naming the file.
    SetupError for a missing or unreadable dataset, and for a training dataset without training identities."""
    name = (cfg.data.test_name or cfg.data.name) if test else cfg.data.name
    kwargs = dict(cfg.data.kwargs)
    if name == "synthetic":
        kwargs = {"size": cfg.data.size, "seed": cfg.data.seed, **kwargs}
    if kwargs.get("on_bad_image") == "skip":
        kwargs.setdefault("verify_images", True)

    def build() -> ReIDData:
        try:
            return build_dataset(name, cfg.data.root, **kwargs)
        except Exception as exc:
            error = _setup_error(f"dataset {name} (data.root={cfg.data.root})", exc)
            if error is None:
                raise
            raise error from exc

    data = build() if du.is_main() else None
    du.barrier()
    data = data if data is not None else build()
    if not test and data.num_train_pids == 0:
        raise SetupError(f"dataset {name} under {data.root} has no training identities (a test-only set): train on "
                         f"another dataset and evaluate on this one with data.test_name={name}")
    return data


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """train.amp -> the autocast dtype (None: float32). bf16 and fp16 work on CPU too (torch's CPU autocast and
    GradScaler), so CI runs both paths; auto is bf16 (fp16 where the GPU lacks bf16) on CUDA, none on CPU."""
    if mode == "none" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if mode == "bf16" else torch.float16


LOG_FORMAT = logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S")


def setup_logging(run_dir: Path | None, hold: bool = False) -> None:
    """Log to the console and (rank 0) to run_dir/log.txt; with `hold` and no folder yet, keep the lines in
    memory until `log_to_file` names it."""
    log = logging.getLogger("amfor")
    log.setLevel(logging.INFO if du.is_main() else logging.WARNING)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    handlers = [logging.StreamHandler()]
    if run_dir is not None and du.is_main():
        handlers.append(logging.FileHandler(run_dir / "log.txt"))
    elif hold and du.is_main():
        handlers.append(logging.handlers.MemoryHandler(capacity=10**6, flushLevel=logging.CRITICAL + 1))
    for h in handlers:
        h.setFormatter(LOG_FORMAT)
        log.addHandler(h)


def log_to_file(run_dir: Path) -> None:
    """Rank 0: from now on also log to run_dir/log.txt, starting with the lines held since `setup_logging`."""
    if not du.is_main():
        return
    log = logging.getLogger("amfor")
    file = logging.FileHandler(run_dir / "log.txt")
    file.setFormatter(LOG_FORMAT)
    for held in [h for h in log.handlers if isinstance(h, logging.handlers.MemoryHandler)]:
        held.setTarget(file)
        held.flush()
        log.removeHandler(held)
        held.close()
    log.addHandler(file)


RUN_DIR_FORMAT = "%Y%m%d-%H%M%S"  # runs/<date>-<name>


def resolve_run_dir(cfg: DictConfig, resume_path: Path | None) -> Path:
    """--output, else the resumed checkpoint's run folder, else runs/<date>-<name> (rank 0 decides; the folder is
    made by `make_run_dir` once the data and model are built)."""
    if cfg.output:
        run_dir = Path(cfg.output)
    elif resume_path is not None:
        run_dir = resume_path.resolve().parent.parent
    else:
        run_dir = Path("runs") / f"{datetime.now():{RUN_DIR_FORMAT}}-{cfg.name}"
    run_dir = Path(du.broadcast_object(str(run_dir)))
    if resume_path is None and (run_dir / "checkpoints" / "last.pt").exists():
        raise FileExistsError(f"{run_dir} already holds a run; continue it with --resume or choose another --output")
    return run_dir


def make_dirs(path: Path) -> Path | None:
    """`mkdir -p path` on rank 0 -> the outermost folder it made (e.g. runs/ on a first run), None when `path`
    was there already (or on the other ranks). Every rank calls."""
    made = None
    if du.is_main():
        missing = [p for p in (path.absolute(), *path.absolute().parents) if not p.exists()]
        made = missing[-1] if missing else None
        path.mkdir(parents=True, exist_ok=True)
    du.barrier()
    return made


def remove_made(path: Path, made: Path) -> None:
    """Undo `make_dirs`: remove `path` with its contents, then its parents up to `made` while they are empty
    (another run may have put a folder in runs/ meanwhile)."""
    path = path.absolute()
    shutil.rmtree(path, ignore_errors=True)
    for folder in path.parents:
        if not folder.is_relative_to(made) or any(folder.iterdir()):
            break
        folder.rmdir()


def make_run_dir(run_dir: Path) -> Path | None:
    """The run folder and its checkpoints/ (rank 0) -> what `make_dirs` made."""
    made = make_dirs(run_dir)
    if du.is_main():
        (run_dir / "checkpoints").mkdir(exist_ok=True)
    return made


def find_last_checkpoint(name: str, runs: Path = Path("runs"), output: str | Path | None = None) -> Path:
    """`--resume` without a path: <output>/checkpoints/last.pt when an output folder is set, else the newest
    runs/<date>-<name>/checkpoints/last.pt of run name `name` (exactly: `x-<name>` runs are not `<name>` runs)."""
    if output:
        last = Path(output) / "checkpoints" / "last.pt"
        if not last.is_file():
            raise CheckpointError(f"--resume: {last} does not exist; pass a checkpoint path")
        return last
    date = re.compile(r"\d{8}-\d{6}-" + re.escape(name))
    found = sorted((p for p in runs.glob("*/checkpoints/last.pt") if date.fullmatch(p.parent.parent.name)),
                   key=lambda p: (p.stat().st_mtime, p.parent.parent.name))
    if not found:
        raise CheckpointError(f"--resume: no run named {name!r} to resume ({runs}/<date>-{name}/checkpoints/last.pt "
                              "in the working directory); pass a checkpoint path, or the run's --config or --set name=")
    return found[-1]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


# --- the run ---------------------------------------------------------------------------------------------
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
        self.amp = amp_dtype(cfg.train.amp, self.device)
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
        self.model = create_model(self.cfg, self.data.num_train_pids, self.num_cameras).to(self.device)
        if hasattr(self.model, "set_train_cameras"):
            self.model.set_train_cameras(self.data.train_cameras)
        seed_everything(self.cfg.train.seed + self.rank)  # then each rank its own stream (dropout, masking)
        self.size = tuple(self.model.input_size)
        self.norm = {k: v for k, v in resolve_data_config(self.model, self.size).items() if k != "size"}
        self.stage1_finished = False
        logger.info("model %s: %d classes, input %s, %.2fM parameters, %d rank(s), device %s, %d loader worker(s)",
                    self.cfg.model.name, self.model.num_classes, self.size,
                    sum(p.numel() for p in self.model.parameters()) / 1e6, self.world, self.device, self.workers)

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
                                CheckpointHook(lambda: self.save(trainer), cfg.checkpoint_every)])
        if self.resume is not None:
            trainer.load_state_dict(self.resume["trainer"])
        self.restore_rng(1)
        logger.info("stage 1: %d epochs x %d steps (batch %d, Adam lr %g)", cfg.stage1_epochs, per_epoch, bs,
                    cfg.stage1_lr)
        trainer.train()
        self.finish_stage1()

    def cache_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage-1 image features of the un-augmented training images, once per run: [N, D] and pids [N].

        The model is a submodule of the wrapper, so extract()'s eval() reaches it (no dropout or drop-path while
        caching) and its train() afterwards restores the model's own mode."""

        class Stage1Features(torch.nn.Module):  # the extract() contract over stage1_features
            def __init__(self, model: torch.nn.Module) -> None:
                super().__init__()
                self.model = model
                self.pretrained_cfg = getattr(model, "pretrained_cfg", None)

            def forward(self, img, camid, global_only=False):
                return {"features": self.model.stage1_features(img, camid)}

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
        model = self.model
        if getattr(model, "has_text", False):
            for p in model.stage1_parameters():
                p.requires_grad_(False)
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
            hooks.append(EvalHook(lambda: evaluate(self.model, self.data, VAL_PAIRS, self.cfg, self.device, self.size,
                                                   amp_dtype=self.amp, num_workers=self.workers,
                                                   rerank=False).get("val", {}),
                                  cfg.eval_every, lambda m: self.save_best(trainer, m), self.log))
        hooks.append(CheckpointHook(lambda: self.save(trainer), cfg.checkpoint_every))
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
        cfg, extra = self.cfg, self.data.extra
        flip = 2 if cfg.test.flip else 1
        val = len(extra.get("val_query", [])) + len(extra.get("val_gallery", []))
        test = sum(len(self.data.splits().get(s, [])) for s in ("query", "query_whole", "gallery"))

        def eval_images(steps: int) -> int:
            runs = (steps // per_epoch // cfg.train.eval_every + 1) if cfg.train.eval_every > 0 and val else 0
            return flip * (runs * val + test)

        def measure_eval() -> float:
            model = self.model
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

        def on_fixed(steps: int, info: dict) -> None:
            cfg.train.max_steps = steps
            self.write_config()
            logger.info("train.max_minutes=%g -> train.max_steps=%d (%.3f s/step over %d steps, %.4f s/eval image, "
                        "%.0f s left)", cfg.train.max_minutes, steps, info["step_s"], info["measured_steps"],
                        info["eval_s_per_image"], info["remaining_s"])
            if du.is_main():
                self.log.write({"type": "budget", "stage": 2, "step": trainer.step, "max_steps": steps, **info})

        return BudgetHook(self.start + 60 * cfg.train.max_minutes, eval_images, on_fixed, measure_eval)

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
