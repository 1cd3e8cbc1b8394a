"""A trained model back from a checkpoint or a weights file, for evaluation (`amfor.test`), export (`amfor.export`) and
extraction (`amfor.Extractor`, `amfor.extract`): `load_model` takes either."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from ..config import build_config
from ..engine.checkpoint import load_checkpoint, load_model_state


def config_of(state: dict, path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """The checkpoint's config, then an optional YAML file, then overrides. Pretrained files are not read again: the
    checkpoint holds the backbone and the text tower (with the text bank), so a trained model evaluates and exports
    after its ImageNet or CLIP files have gone."""
    cfg = build_config(path, overrides, base=state["config"])
    cfg.model.pretrained = None
    if cfg.model.kwargs.get("clip_weights") is not None:
        cfg.model.kwargs.clip_weights = None
    return cfg


def load_trained_model(state: dict, cfg: DictConfig, device: torch.device | str = "cpu",
                       path: str | Path = "checkpoint") -> torch.nn.Module:
    """The checkpoint's model in eval mode: built with its classes and cameras, text bank made, weights loaded."""
    from ..engine.build import build_model

    model = build_model(cfg, int(state["num_classes"]), int(state["num_cameras"]))
    if state.get("stage1_finished", True):
        model.finish_stage1()  # creates the text-bank buffer the state dict holds
    load_model_state(model, state, path)
    return model.to(device).eval()


def load_for_inference(checkpoint: str | Path, config: str | Path | None = None, overrides: list[str] | None = None,
                       device: torch.device | str = "cpu") -> tuple[torch.nn.Module, DictConfig, dict]:
    state = load_checkpoint(checkpoint)
    cfg = config_of(state, config, overrides)
    return load_trained_model(state, cfg, device, checkpoint), cfg, state


def is_weights_file(path: str | Path) -> bool:
    """Whether `path` starts as a safetensors file does: an 8-byte little-endian header length, then a JSON object."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return Path(path).suffix == ".safetensors"
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 100 * 2**20


def load_model(path: str | Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The eval model of a training checkpoint (.pt) or of a weights file (.safetensors, `amfor.deploy.weights`),
    told apart by their suffix or content. Anything else is a CheckpointError naming the file."""
    from .weights import load_weights

    if Path(path).suffix == ".safetensors" or is_weights_file(path):
        return load_weights(path, device)
    model, _, _ = load_for_inference(path, device=device)
    return model
