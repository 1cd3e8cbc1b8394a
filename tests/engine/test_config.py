"""amfor.config: defaults, YAML files, dotted overrides, and the errors a user gets."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from amfor.config import (
    DEMO_SWITCHES,
    Config,
    ConfigError,
    build_config,
    find_config,
    list_configs,
    load_yaml,
    to_dict,
    valid_keys,
)

BENCHMARKS = ["market1501", "dukemtmc", "occluded_duke", "occluded_reid", "p_dukemtmc", "msmt17"]


def test_required_keys_exist_with_their_types():
    cfg = build_config()
    for key in ["data.name", "data.root", "data.size", "model.name", "train.seed", "train.batch_size",
                "train.stage1_epochs", "train.epochs", "train.max_minutes", "train.eval_every", "train.amp"]:
        assert key in valid_keys()
        assert OmegaConf.select(cfg, key) is not None
    assert cfg.data.name == "synthetic" and cfg.model.name == "amfor_vit_tiny_patch16"
    assert 0 < cfg.train.max_minutes <= 10  # the embedded default fits the 10-minute demo


def test_synthetic_yaml_is_the_embedded_default():
    """The shipped `synthetic` config spells out exactly the defaults `python -m amfor.train` runs with."""
    assert to_dict(build_config("synthetic")) == to_dict(build_config())


def test_model_kwargs_belong_to_the_model_they_were_written_for(tmp_path):
    """The demo's switches stay with the demo's model: a config or override naming another model (or a checkpoint's
    complete config) starts from no kwargs, so the real-data configs get every component."""
    assert dict(build_config().model.kwargs) == DEMO_SWITCHES
    assert dict(build_config(overrides=["model.kwargs.amff=true"]).model.kwargs) == {**DEMO_SWITCHES, "amff": True}
    assert dict(build_config(overrides=["model.name=amfor_vit_small_patch16"]).model.kwargs) == {}
    assert dict(build_config("occluded_duke").model.kwargs) == {"clip_weights": "pretrained/ViT-B-16.pt"}
    same = tmp_path / "same.yaml"
    same.write_text("model:\n  name: amfor_vit_tiny_patch16\n  kwargs:\n    hpr: true\n")
    assert dict(build_config(same).model.kwargs) == {**DEMO_SWITCHES, "hpr": True}  # the same model: merged
    checkpoint = {"model": {"name": "amfor_vit_tiny_patch16", "kwargs": {"hpr_fraction": 0.5}}}
    assert dict(build_config(base=checkpoint).model.kwargs) == {"hpr_fraction": 0.5}  # a run's own, complete


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_configs_carry_the_paper_recipe(name):
    cfg = build_config(name, [f"data.root=/data/{name}"])
    t = cfg.train
    assert (t.stage1_epochs, t.stage1_lr, t.stage1_warmup_epochs) == (120, 3.5e-4, 5)
    assert (t.epochs, t.lr, t.momentum, t.weight_decay, t.bias_lr_factor, t.warmup_epochs) == \
        (120, 0.004, 0.9, 1e-4, 2.0, 5)
    assert (t.batch_size, cfg.data.num_instances, t.max_minutes, t.amp) == (64, 4, 0, "auto")
    assert (cfg.data.flip, cfg.data.pad, cfg.data.erasing) == (0.5, 10, 0.5)
    assert cfg.model.name == "amfor_vit_base_patch16" and cfg.data.root == f"/data/{name}"
    from amfor.data import list_datasets
    assert cfg.data.name in list_datasets() and (cfg.data.test_name or cfg.data.name) in list_datasets()


def test_occluded_reid_trains_on_market():
    cfg = build_config("occluded_reid")
    assert cfg.data.name == "market1501" and cfg.data.test_name == "occluded_reid"


def test_shipped_configs_are_package_data_found_by_name_or_path(tmp_path, monkeypatch):
    """`--config market1501`, `market1501.yaml` or a path: the shipped files live inside the package (installed
    with it); a file of that name in the working directory wins; anything else names the shipped configs."""
    import amfor

    shipped = Path(amfor.__file__).parent / "configs" / "market1501.yaml"
    assert shipped.is_file() and {"synthetic", *BENCHMARKS} <= set(list_configs())
    monkeypatch.chdir(tmp_path)
    assert find_config("market1501") == find_config("market1501.yaml") == shipped
    assert find_config(shipped) == shipped
    assert to_dict(build_config("market1501")) == to_dict(build_config(str(shipped)))
    (tmp_path / "market1501.yaml").write_text("name: mine\n")
    assert find_config("market1501.yaml") == Path("market1501.yaml")  # an existing file is taken as given
    assert build_config("market1501.yaml").name == "mine" and build_config("market1501").name == "market1501"
    for wrong in ("market", "configs/market1501.yaml", str(tmp_path / "nothing.yaml")):
        with pytest.raises(ConfigError, match=r"no config file .*market1501, msmt17"):
            build_config(wrong)


def test_precedence_defaults_file_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.01\n  epochs: 7\nmodel:\n  kwargs: {depth: 2}\n")
    cfg = build_config(path, ["train.epochs=9", "model.kwargs.drop_path=0.1"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.batch_size) == (0.01, 9, Config().train.batch_size)
    assert dict(cfg.model.kwargs) == {**DEMO_SWITCHES, "depth": 2, "drop_path": 0.1}  # merged into the demo's


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown key 'train.lrr'; did you mean 'train.lr'?"),
    ("trian.epochs=1", "did you mean 'train.epochs'?"),
    ("data.nmae=market1501", "did you mean 'data.name'?"),
    ("train.epochs=many", "bad value for 'train.epochs'"),
    ("train.amp=fp8", "train.amp must be one of"),
    ("train.batch_size=30", "multiple of data.num_instances"),
    ("train.lr", "must look like key=value"),
])
def test_override_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=None) as info:
        build_config(overrides=[override])
    assert message in str(info.value)


def test_unknown_key_in_a_file_names_file_and_closest_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  warmup_epoch: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'train.warmup_epoch'; did you mean 'train.warmup_"):
        build_config(path)


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("train: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(path)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_yaml(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_yaml(tmp_path / "missing.yaml")


def test_cli_print_config_and_error_exit(capsys):
    from amfor.train import main

    assert main(["--print-config", "--set", "train.epochs=3", "--data-root", "/somewhere"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 3" in out and "root: /somewhere" in out
    assert main(["--set", "train.epochz=3"]) == 2
    assert "did you mean 'train.epochs'?" in capsys.readouterr().err
