"""Typed run configuration: dataclasses, merged with YAML files and `key=value` overrides by OmegaConf.

The dataclass defaults are the embedded default run (`python -m amfor.train` with no arguments: the
synthetic occluded dataset, the tiny model, both stages on the CPU in a 10-minute budget);
the shipped configs (package data in amfor/configs/) are found by name: `synthetic` writes the same values out,
`market1501`, `occluded_duke`, ... hold the paper's recipe (docs/spec.md section 7). Precedence: defaults < YAML
file < `--set` overrides. Unknown keys are rejected naming the closest valid key; values are type-checked; YAML
is read with `yaml.safe_load`.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # the shipped configs, installed with the package
AMP_MODES = ("auto", "none", "bf16", "fp16")
OPTIMIZERS = ("sgd", "adamw")
DISTANCES = ("part", "global")


class ConfigError(ValueError):
    """A configuration file or override that does not fit the schema (unknown key, wrong type or value)."""


@dataclass
class DataConfig:
    name: str = "synthetic"             # a name from amfor.data.list_datasets()
    root: str = "data"                  # the folder holding the dataset (synthetic: generated and cached there)
    size: str = "default"               # synthetic only: tiny | small | default
    seed: int = 0                       # synthetic only: generation seed
    test_name: str = ""                 # evaluate on another dataset (Occluded-REID after Market training); "" = name
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of the dataset builder
    num_workers: int = -1               # loader processes per rank; -1 = CPUs per rank - 1, within [1, 8]
    num_instances: int = 4              # K of the P x K identity batches
    flip: float = 0.5
    pad: int = 10
    erasing: float = 0.0                # random erasing probability; the paper's 0.5 is in every real-data config
                                        # (off for the synthetic demo: chosen on the validation split, docs/model.md)
    occluder: float = 0.0               # probability of pasting a synthetic occluder on a training image
    load_masks: bool = True             # feed human-parsing masks to the model when the dataset has them
    test_batch_size: int = 128


DEMO_SWITCHES = {"amff": False, "text": False, "amgd": False, "hpr": False, "part_recon": False}


@dataclass
class ModelConfig:
    name: str = "amfor_vit_tiny_patch16"  # a name from amfor.list_models(), or "package.module:factory"
    pretrained: str | None = None       # path of backbone weights (see README), None = random initialisation
    # keyword overrides of create_model; a config naming another model starts from none. The default (the demo's):
    # camera centring (the tiny variant's own default), the parts and the teacher-student decoder, with AMFF, text,
    # AMGD and the HPR-Decoder off: the configuration that won on the validation split at the demo's budget
    # (docs/ablation.md). `--set model.kwargs.amff=true ...` switches components back on.
    kwargs: dict[str, Any] = field(default_factory=lambda: dict(DEMO_SWITCHES))


@dataclass
class TrainConfig:
    seed: int = 0
    batch_size: int = 64                # global batch (all ranks together) = P identities x K images
    # stage 1: prompt learning on cached image features (skipped when the model has no text tower or 0 epochs)
    stage1_epochs: int = 10
    stage1_batch_size: int = 0          # 0 = batch_size
    stage1_lr: float = 3.5e-4
    stage1_weight_decay: float = 1e-4
    stage1_warmup_epochs: float = 1.0
    stage1_warmup_factor: float = 0.03  # warm-up starts at lr x factor (CLIP-ReID: 1e-5 / 3.5e-4)
    stage1_min_lr: float = 1e-6
    # stage 2: the full model, SGD
    epochs: int = 120
    max_steps: int = 0                  # stage-2 steps; 0 = epochs x steps per epoch (set by max_minutes when used)
    max_minutes: float = 9.0            # wall-clock budget of the whole run, 0 = none: fixes max_steps once, logged
    optimizer: str = "adamw"            # adamw (the demo: a backbone trained from scratch) | sgd (the paper)
    lr: float = 0.001
    momentum: float = 0.9               # sgd only
    weight_decay: float = 0.05
    bias_lr_factor: float = 2.0
    warmup_epochs: float = 2.0
    warmup_factor: float = 0.1
    min_lr: float = 1e-6
    clip_grad: float = 5.0              # max global gradient norm, 0 = no clipping
    amp: str = "auto"                   # auto (bf16 on GPU, float32 on CPU, the log says why) | none | bf16 | fp16
    eval_every: int = 5                 # evaluate the validation split every N stage-2 epochs (0 = never)
    checkpoint_every: int = 0           # write last.pt every N steps; 0 = at each epoch end
    keep_checkpoints: int = 0           # also keep the N latest numbered checkpoints (0 = only last.pt/best.pt)
    log_every: int = 20                 # steps between log lines (and loss checks on GPU)
    sync_bn: bool = True                # SyncBatchNorm under multi-GPU DDP (not supported on CPU/gloo)
    find_unused_parameters: bool = False  # DDP: true allows parameters without gradient in a step (slower)


@dataclass
class TestConfig:
    distance: str = "part"              # part: AMFOR visibility-weighted part distance | global: global feature only
    flip: bool = False                  # average the features of the mirrored image
    rerank: bool = True                 # also report k-reciprocal re-ranked rows (<split>_rerank; the plain rows
    #                                     always come first). On for the synthetic demo (+0.07 to +0.11 val mAP on
    #                                     three checkpoints, docs/model.md "Evaluation"); off in the real-data configs
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    num_ranked: int = 8                 # queries drawn in the ranked-list picture (0 = no pictures)


@dataclass
class Config:
    name: str = "synthetic"             # run name: the output folder is runs/<date>-<name>
    output: str = ""                    # "" = runs/<date>-<name>
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    test: TestConfig = field(default_factory=TestConfig)


def valid_keys(node: Any = None, prefix: str = "") -> list[str]:
    """Every dotted key of the schema: `data.name`, `train.lr`, ... (free-form `kwargs` dicts end the path)."""
    node = OmegaConf.structured(Config) if node is None else node
    keys = []
    for key, value in node.items():
        full = f"{prefix}{key}"
        keys.append(full)
        if isinstance(value, DictConfig) and not key.endswith("kwargs"):
            keys += valid_keys(value, full + ".")
    return keys


def _closest(key: str) -> str:
    candidates = valid_keys()
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not match:  # compare the last component only (e.g. "lrate" -> train.lr)
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in candidates}
        near = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.5)
        match = [by_leaf[near[0]]] if near else []
    return f"; did you mean '{match[0]}'?" if match else ""


def dotted_items(tree: dict, prefix: str = "", into_kwargs: bool = True) -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: the leaves of a nested mapping by dotted key (an empty mapping is a leaf;
    with `into_kwargs=False` a free-form `kwargs` mapping is one leaf too)."""
    out = {}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and value and (into_kwargs or not str(key).endswith("kwargs")):
            out.update(dotted_items(value, full + ".", into_kwargs))
        else:
            out[full] = value
    return out


def _check_keys(tree: dict, source: str) -> None:
    known = set(valid_keys())
    for key in dotted_items(tree, into_kwargs=False):
        if key not in known and not any(key.startswith(k + ".") for k in known if k.endswith("kwargs")):
            raise ConfigError(f"{source}: unknown key '{key}'{_closest(key)}")


def _merge(base: DictConfig, other: Any, source: str, own_kwargs: bool = False) -> DictConfig:
    """`other` over `base`. `model.kwargs` belong to the model they were written for: when `other` names another
    `model.name` (or `own_kwargs`, for a checkpoint's complete config), it starts from no kwargs rather than
    inheriting those of the default model (e.g. the demo's switches)."""
    tree = OmegaConf.to_container(other) if isinstance(other, DictConfig) else other
    _check_keys(tree, source)
    model = tree.get("model") if isinstance(tree, dict) else None
    name = model.get("name") if isinstance(model, dict) else None
    if own_kwargs or (name is not None and name != base.model.name):
        base = copy.deepcopy(base)
        base.model.kwargs = {}
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as exc:
        key = exc.full_key or str(exc.key)
        raise ConfigError(f"{source}: unknown key '{key}'{_closest(key)}") from None
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "") or "?"
        first = str(exc).splitlines()[0]
        raise ConfigError(f"{source}: bad value for '{key}': {first}") from None


def list_configs() -> list[str]:
    """Names of the shipped configs: `market1501`, `occluded_duke`, `synthetic`, ..."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def find_config(name_or_path: str | Path) -> Path:
    """A config file: an existing path, else a shipped config by name (`market1501` or `market1501.yaml`).

    An existing file is taken as given: `./market1501.yaml` wins over the shipped `market1501.yaml`."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.parent == Path(".") and path.suffix in ("", ".yaml", ".yml"):
        shipped = CONFIG_DIR / f"{path.stem}.yaml"
        if shipped.is_file():
            return shipped
    raise ConfigError(f"no config file {name_or_path}: pass a path or the name of a shipped config "
                      f"({', '.join(list_configs())})")


def load_yaml(path: str | Path) -> dict:
    """A YAML mapping read with yaml.safe_load (no arbitrary object construction)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def parse_overrides(overrides: list[str]) -> DictConfig:
    """`["train.lr=0.01", "model.kwargs.depth=2"]` -> a nested config; values are parsed as YAML scalars."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.lr=0.01)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot parse overrides {overrides}: {exc}") from None


def build_config(path: str | Path | None = None, overrides: list[str] | None = None,
                 base: dict | None = None) -> DictConfig:
    """Defaults, then `base` (e.g. a checkpoint's config), then the YAML file at `path` (a path or the name of a
    shipped config, see `find_config`), then `overrides`."""
    cfg = OmegaConf.structured(Config)
    if base is not None:
        cfg = _merge(cfg, base, "checkpoint config", own_kwargs=True)
    if path is not None:
        path = find_config(path)
        cfg = _merge(cfg, load_yaml(path), str(path))
    if overrides:
        cfg = _merge(cfg, parse_overrides(overrides), "--set")
    check(cfg)
    return cfg


def check(cfg: DictConfig) -> None:
    """Value checks the types cannot express."""
    rules = [
        (cfg.train.amp in AMP_MODES, f"train.amp must be one of {AMP_MODES}, got {cfg.train.amp!r}"),
        (cfg.train.optimizer in OPTIMIZERS,
         f"train.optimizer must be one of {OPTIMIZERS}, got {cfg.train.optimizer!r}"),
        (cfg.test.distance in DISTANCES, f"test.distance must be one of {DISTANCES}, got {cfg.test.distance!r}"),
        (cfg.train.batch_size > 0 and cfg.train.batch_size % cfg.data.num_instances == 0,
         f"train.batch_size ({cfg.train.batch_size}) must be a positive multiple of data.num_instances "
         f"({cfg.data.num_instances})"),
        (cfg.train.epochs >= 0 and cfg.train.stage1_epochs >= 0, "train.epochs and train.stage1_epochs must be >= 0"),
        (cfg.train.max_steps >= 0 and cfg.train.max_minutes >= 0, "train.max_steps and train.max_minutes must be >= 0"),
        (cfg.train.log_every > 0, "train.log_every must be > 0"),
        (cfg.train.lr > 0 and cfg.train.stage1_lr > 0, "train.lr and train.stage1_lr must be > 0"),
    ]
    for ok, message in rules:
        if not ok:
            raise ConfigError(message)


def to_dict(cfg: DictConfig) -> dict:
    """Plain nested dict (interpolations resolved): what checkpoints and config.yaml store."""
    return OmegaConf.to_container(cfg, resolve=True)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
