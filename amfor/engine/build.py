"""Building a run: the model and data from a config, the precision (AMP), the run folder and the logging.

`amfor.engine.runner.Run` drives the stages with what these build. Run folder (rank 0 writes): config.yaml
(resolved; max_steps filled in when a time budget fixed it), metrics.jsonl, log.txt, checkpoints/{last,best}.pt,
results.json, ranked_*.png and cmc.png. It is created once the data and the model are built (the log lines before
that are written into log.txt then), and a new folder is removed again when the run fails before its first metrics
record, so a failed start leaves nothing behind.
"""

from __future__ import annotations

import functools
import importlib
import logging
import logging.handlers
import os
import re
import shutil
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .. import config as C
from ..data import build_dataset
from ..data.records import ReIDData
from ..extras import require
from ..utils import distributed as du
from ..utils.cpu_features import native_bf16
from .checkpoint import CheckpointError


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


def process_start_time() -> float:
    """Wall-clock time at which this process started (Linux /proc), else now: budgets count imports too."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def model_factory(name: str) -> Callable[..., torch.nn.Module]:
    """model.name -> a factory of (num_classes, num_cameras=, pretrained=, **kwargs): the function
    `package.module:function`, else the registered model `name`."""
    if ":" in name:
        module, _, attr = name.partition(":")
        return getattr(importlib.import_module(module), attr)
    import amfor  # the models (timm, open_clip) are imported when a run starts
    return functools.partial(amfor.create_model, name)


def build_model(cfg: DictConfig, num_classes: int, num_cameras: int) -> torch.nn.Module:
    """The configured model: `amfor.create_model(model.name, ...)`, or the factory `package.module:function` named
    by model.name, with model.pretrained and model.kwargs. (`model.kwargs.num_cameras` is read by `count_cameras`,
    not passed twice; lists and mappings reach the factory as plain Python containers.) SetupError for a missing
    weights file or a bad model argument."""
    name = cfg.model.name
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.model.kwargs, resolve=True).items() if k != "num_cameras"}
    factory = model_factory(name)
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


def _build_dataset(name: str, root: str, kwargs: dict) -> ReIDData:
    """`build_dataset(name, root, **kwargs)`, its user errors as a SetupError naming the dataset and root."""
    try:
        return build_dataset(name, root, **kwargs)
    except Exception as exc:
        error = _setup_error(f"dataset {name} (data.root={root})", exc)
        if error is None:
            raise
        raise error from exc


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
    data = _build_dataset(name, cfg.data.root, kwargs) if du.is_main() else None
    du.barrier()
    data = data if data is not None else _build_dataset(name, cfg.data.root, kwargs)
    if not test and data.num_train_pids == 0:
        raise SetupError(f"dataset {name} under {data.root} has no training identities (a test-only set): train on "
                         f"another dataset and evaluate on this one with data.test_name={name}")
    return data


def amp_choice(mode: str, device: torch.device) -> tuple[torch.dtype | None, str]:
    """train.amp -> (the autocast dtype, None for float32; why, in words). bf16 and fp16 work on CPU too (torch's CPU
    autocast and GradScaler), so CI runs both paths. auto: bf16 on CUDA (fp16 where the GPU lacks bf16); float32 on
    the CPU, where bf16 without native support (AVX-512 bf16 or AMX) is slower than float32 (docs/model.md, "bf16
    autocast on the CPU"), and with it has not yet been shown to cost no accuracy at equal steps."""
    if mode == "none":
        return None, "train.amp=none"
    if mode in ("bf16", "fp16"):
        return (torch.bfloat16 if mode == "bf16" else torch.float16), f"train.amp={mode}"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: bf16 on CUDA"
        return torch.float16, "auto: fp16 (this GPU has no bf16)"
    native, why = native_bf16()
    if not native:
        return None, f"auto: float32, {why}"
    return None, (f"auto: float32; this CPU has {why}, but bf16 training on the CPU is not yet validated against "
                  f"float32 (docs/model.md, \"bf16 autocast on the CPU\"): train.amp=bf16 turns it on")


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """train.amp -> the autocast dtype (None: float32); see `amp_choice`."""
    return amp_choice(mode, device)[0]


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
