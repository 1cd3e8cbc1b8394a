"""The slim, shareable weights file: the tensors of the eval path only, as safetensors, with what rebuilds the model.

A training checkpoint holds everything training needs (identity classifiers, the reconstruction decoders, the
teacher's centring, the prompts and the text tower, the optimiser...). Inference runs `forward_eval`, which reads
a fraction of it: the encoder, the global and part necks' BN, the part decoder and visibility head, the text bank
through `text_to_visual`... Which tensors it reads is measured, not listed: `eval_state_keys` runs the eval forward
on an example batch and records every parameter and buffer whose storage a torch function received.

File (safetensors): the eval tensors under their `state_dict` names, and in the header's metadata (str -> str):
    format          "amfor-weights"            version        "1"
    model_name      the registry name or the `package.module:function` factory
    model_kwargs    JSON: the factory's keyword arguments (no pretrained or CLIP file: nothing is read again)
    num_classes     the model's identities as built (the text bank's rows: the AMFF-Encoder reads them)
    num_cameras     its cameras as built
    data_config     JSON: `resolve_data_config(model)`, the preprocessing (size, mean, std, interpolation)
    amfor_version   the amfor that wrote it
`load_weights` builds the model with its factory (training-only modules get their initial values and are not run),
loads the file's tensors and checks that every tensor the eval forward reads came from the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ..data import resolve_data_config
from ..engine.checkpoint import CheckpointError
from ..extras import require
from ..ops import use_backend

FORMAT = "amfor-weights"
VERSION = 1
SUFFIX = ".safetensors"


class WeightsError(CheckpointError):
    """A weights file that cannot be written or used: missing, foreign, damaged, or for another model; the message
    names the file. (A CheckpointError: the command lines report it in one line.)"""


class _StorageRecorder(TorchFunctionMode):
    """Records the storages of the tensors every torch function receives (views share their base's storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for leaf in tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor) and leaf.numel() > 0:
                self.seen.add(leaf.untyped_storage().data_ptr())
        return func(*args, **kwargs)


def _example(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random images at the model's size with a known camera and, for a model with cameras, an unknown one (-1:
    the seen cameras' mean); `global_only` reads a subset of what the full eval forward reads."""
    h, w = resolve_data_config(model)["size"]
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    images = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0)).to(device)
    num_cameras = int(getattr(model, "num_cameras", 0) or 0)
    return images, torch.tensor([num_cameras - 1, -1] if num_cameras > 0 else [0, 0], device=device)


@torch.no_grad()
def eval_state_keys(model: nn.Module) -> list[str]:
    """The `state_dict` keys the eval forward `model(images, camids[, global_only=True])` reads, in state-dict order:
    the tensors a torch function received on an example batch (amfor ops as their PyTorch references), and with any of a
    module's tensors that module's one-element buffers (flags read when the state is loaded, such as the text
    bank's `bank_ready`, and counters such as BN's)."""
    was_training = model.training
    model.eval()
    recorder = _StorageRecorder()
    try:
        with use_backend("torch"), recorder:
            model(*_example(model))
    finally:
        model.train(was_training)
    state = model.state_dict(keep_vars=True)
    used = {k for k, t in state.items() if t.numel() == 0 or t.untyped_storage().data_ptr() in recorder.seen}
    owners = {k.rpartition(".")[0] for k in used}
    flags = {k for k, t in state.items() if k.rpartition(".")[0] in owners and t.numel() == 1
             and not isinstance(t, nn.Parameter)}
    return [k for k in state if k in used | flags]


def data_config_record(model: nn.Module) -> dict:
    """The model's preprocessing (`resolve_data_config`) as JSON has it: tuples as lists."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in resolve_data_config(model).items()}


def _metadata(model: nn.Module, model_name: str, model_kwargs: Mapping, num_cameras: int | None,
              extra: Mapping[str, str] | None) -> dict[str, str]:
    from .. import __version__

    cameras = int(getattr(model, "num_cameras", 0) or 0) if num_cameras is None else int(num_cameras)
    return {**{k: str(v) for k, v in (extra or {}).items()}, "format": FORMAT, "version": str(VERSION),
            "model_name": str(model_name), "model_kwargs": json.dumps(dict(model_kwargs), sort_keys=True),
            "num_classes": str(int(getattr(model, "num_classes", 0))), "num_cameras": str(cameras),
            "data_config": json.dumps(data_config_record(model)), "amfor_version": __version__}


def save_weights(model: nn.Module, path: str | Path, model_name: str, model_kwargs: Mapping | None = None,
                 num_cameras: int | None = None, metadata: Mapping[str, str] | None = None) -> dict[str, str]:
    """Write the eval tensors of `model` (built as `factory(num_classes, num_cameras=, **model_kwargs)` with the
    factory `model_name`) to `path` (.safetensors), through a temporary file; returns the metadata written.
    `metadata`: more str -> str entries (e.g. the source checkpoint)."""
    require("safetensors", extra="safetensors", purpose="the weights file")
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != SUFFIX:
        raise WeightsError(f"{path}: a weights file ends in {SUFFIX}, not {path.suffix or '(none)'!r}")
    kwargs = dict(model_kwargs or {})
    if kwargs.get("clip_weights") is not None:  # the trained weights are in the file: loading reads no CLIP file
        kwargs["clip_weights"] = None
    keys = eval_state_keys(model)
    state = model.state_dict()
    tensors = {k: state[k].detach().cpu().clone().contiguous() for k in keys}  # own storages (safetensors: no sharing)
    meta = _metadata(model, model_name, kwargs, num_cameras, metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return meta


def weights_from_checkpoint(checkpoint: str | Path, path: str | Path, overrides: list[str] | None = None
                            ) -> dict[str, str]:
    """The weights file of a training checkpoint: its model in eval mode, its config's model name and kwargs."""
    from ..config import to_dict
    from ..engine.checkpoint import load_checkpoint
    from .load import config_of, load_trained_model

    state = load_checkpoint(checkpoint)
    cfg = config_of(state, None, overrides)
    model = load_trained_model(state, cfg, "cpu", checkpoint)
    kwargs = {k: v for k, v in to_dict(cfg.model.kwargs).items() if k != "num_cameras"}
    return save_weights(model, path, cfg.model.name, kwargs, int(state["num_cameras"]),
                        {"source": Path(checkpoint).name})


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a weights file; WeightsError naming the file when it is missing or not one."""
    require("safetensors", extra="safetensors", purpose=f"the weights file {path}")
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own kinds for foreign or truncated files
        raise WeightsError(f"cannot read weights file {path} (not a safetensors file, or damaged): "
                           f"{type(exc).__name__}: {exc}") from exc
    if metadata.get("format") != FORMAT:
        what = "a features file (amfor.extract's output)" if "paths" in metadata else "a safetensors file"
        raise WeightsError(f"{path} is {what}, not an amfor weights file (python -m amfor.export --format weights "
                           "writes one)")
    if int(metadata.get("version", 0)) > VERSION:
        raise WeightsError(f"{path} has weights version {metadata['version']}, newer than this amfor ({VERSION})")
    return tensors, metadata


def load_weights(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """The model of a weights file in eval mode on `device`. No pretrained or CLIP file is read."""
    from ..engine.build import model_factory

    tensors, meta = read_weights(path)
    name = meta["model_name"]
    try:
        kwargs = json.loads(meta["model_kwargs"])
        model = model_factory(name)(int(meta["num_classes"]), num_cameras=int(meta["num_cameras"]), pretrained=None,
                                    **kwargs)
    except (KeyError, ValueError, TypeError, ImportError, AttributeError) as exc:
        raise WeightsError(f"{path}: cannot build its model {name!r}: {type(exc).__name__}: {exc}") from exc
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise WeightsError(f"{path} does not fit its model {name!r}: unexpected {result.unexpected_keys[:5]}")
    absent = sorted(set(eval_state_keys(model)) - set(tensors))
    if absent:
        raise WeightsError(f"{path} lacks tensors the eval forward of {name!r} reads: {absent[:5]}")
    stored = json.loads(meta.get("data_config", "null"))
    built = data_config_record(model)
    if stored is not None and stored != built:
        raise WeightsError(f"{path}: its preprocessing {stored} differs from its model's as built {built}")
    return model.to(device).eval()
