"""Checkpoints: atomic writes, safe loads (`weights_only=True`) and the RNG states an exact resume needs.

A checkpoint is a dict with `format` = FORMAT: the resolved config, model / optimiser / scheduler /
scaler states, the stage, step and loader position, every rank's RNG states and the hooks' states (best
validation mAP, ...). Only tensors and plain containers go in, so `torch.load(weights_only=True)` reads it.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

FORMAT = "amfor-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, truncated, not written by amfor, or for another model."""


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Write `state` to `path` atomically: temporary file in the same folder, fsync, rename, fsync the folder.

    A crash at any moment leaves either the previous file or the new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read an amfor checkpoint with `weights_only=True`; CheckpointError with the reason when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for truncated or foreign files
        raise CheckpointError(f"cannot read checkpoint {path} (corrupt, truncated or not a torch file): "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        keys = list(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not an amfor checkpoint (found {keys}); a plain state dict of "
                              "backbone weights goes in model.pretrained instead")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state['version']}, newer than this amfor ({VERSION})")
    return state


def load_model_state(model: torch.nn.Module, state: dict, path: str | Path = "checkpoint") -> None:
    """Load `state["model"]` strictly, naming missing/unexpected keys and the checkpoint's model on mismatch."""
    result = model.load_state_dict(state["model"], strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path} does not fit the model (checkpoint model {state.get('model_name')!r}, "
            f"{state.get('num_classes')} classes): missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}")


def rng_state() -> dict:
    """This process's RNG states (torch CPU and CUDA, numpy, python) as tensors and plain lists."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                       "gauss": float(gauss)},
             "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
