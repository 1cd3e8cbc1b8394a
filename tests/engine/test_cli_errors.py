"""What a user gets from the command lines when something is wrong: one line naming the problem and the file,
exit code 2, no traceback, and no run folder left behind; and which run a bare `--resume` continues."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from cli_runs import run_cli
from PIL import Image

import amfor
from amfor.config import DEMO_SWITCHES, build_config, to_dict
from amfor.engine.build import build_data, find_last_checkpoint
from amfor.engine.checkpoint import CheckpointError, save_checkpoint
from amfor.export import main as export_main
from amfor.test import main as evaluate_main  # not test_*: pytest would collect it
from amfor.train import main as train_main


def tiny_args(root: Path, *extra: str) -> list[str]:
    """A short run of the tiny model on the tiny synthetic set (stage 1 off, 2 steps, no validation)."""
    return ["--data-root", str(root), "--device", "cpu", "--set", "data.size=tiny", "data.num_workers=0",
            "train.batch_size=8", "train.stage1_epochs=0", "train.max_steps=2", "train.max_minutes=0",
            "train.eval_every=0", "test.num_ranked=0", *extra]


def error_line(capsys, prog: str = "amfor.train") -> str:
    """The one error line on stderr (the log lines before it are fine), with no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if f"{prog}: error:" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert err.rstrip().splitlines()[-1] == errors[0], err
    return errors[0]


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """The working directory of the command (runs/ would be made here)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_missing_dataset_root(workdir, capsys):
    missing = workdir / "no-such-folder"
    assert train_main(["--config", "market1501", "--data-root", str(missing), "--device", "cpu"]) == 2
    line = error_line(capsys)
    assert "dataset market1501" in line and "dataset not found" in line and str(missing) in line
    assert not (workdir / "runs").exists()


def _garbage(path: Path) -> Path:
    path.write_bytes(b"this is not a weights file\n" * 10)
    return path


@pytest.mark.parametrize("key, make", [
    ("model.pretrained", lambda d: d / "missing_vit.pth"),
    ("model.pretrained", lambda d: _garbage(d / "broken_vit.pth")),
    ("model.kwargs.clip_weights", lambda d: d / "missing_ViT-B-16.pt"),
    ("model.kwargs.clip_weights", lambda d: _garbage(d / "broken_ViT-B-16.pt")),
], ids=["pretrained-missing", "pretrained-unreadable", "clip-missing", "clip-unreadable"])
def test_missing_or_unreadable_weights_file(tiny_root, workdir, capsys, key, make):
    path = make(workdir)
    text = ["model.kwargs.text=true"] if "clip" in key else []
    assert train_main(tiny_args(tiny_root, *text, f"{key}={path}")) == 2
    line = error_line(capsys)
    assert "model amfor_vit_tiny_patch16" in line and str(path) in line
    assert not (workdir / "runs").exists()


def _jpeg(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 64), (value, 100, 50)).save(path)


def test_dataset_without_training_identities(workdir, capsys):
    """Occluded-REID is a test-only set: training on it is refused before anything is written."""
    root = workdir / "datasets"
    for pid in ("001", "002"):
        for kind in ("occluded_body_images", "whole_body_images"):
            _jpeg(root / "Occluded_REID" / kind / pid / f"{pid}_01.jpg", int(pid) * 40)
    out = workdir / "run"
    assert train_main(tiny_args(root, "data.name=occluded_reid", "--output", str(out))) == 2
    line = error_line(capsys)
    assert "no training identities" in line and "occluded_reid" in line and str(root) in line
    assert "data.test_name=occluded_reid" in line  # what to do instead
    assert not out.exists()


@pytest.fixture
def broken_copy(tiny_root, tmp_path) -> Path:
    """The tiny synthetic set in the Market layout (data.name=custom) with every training image undecodable."""
    src = next(tiny_root.glob("synthetic_tiny_seed*"))
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    for image in (dst / "bounding_box_train").glob("*.jpg"):
        image.write_bytes(b"\xff\xd8 truncated")
    return dst


@pytest.mark.parametrize("workers", [0, 1])
def test_undecodable_image_ends_the_run_naming_it(broken_copy, workdir, capsys, workers):
    """Read in the main process or in a loader worker (which wraps the error with its own traceback): one line,
    the image's path, the setting that skips such images; the run folder made for it is gone, a folder that was
    there before stays."""
    args = tiny_args(broken_copy, "data.name=custom", f"data.num_workers={workers}")
    if workers:
        out = workdir / "existing"
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        args += ["--output", str(out)]
    assert train_main(args) == 2
    line = error_line(capsys)
    assert "cannot read image" in line and str(broken_copy / "bounding_box_train") in line
    assert "data.kwargs.on_bad_image=skip" in line
    if workers:
        assert (workdir / "existing" / "notes.txt").read_text() == "mine"
    else:
        assert not (workdir / "runs").exists()


def test_on_bad_image_skip_drops_the_image_when_the_dataset_is_built(tiny_root, tmp_path):
    src = next(tiny_root.glob("synthetic_tiny_seed*"))
    root = tmp_path / "one-broken"
    shutil.copytree(src, root)
    images = sorted((root / "bounding_box_train").glob("*.jpg"))
    images[0].write_bytes(b"not a jpeg")
    cfg = build_config(overrides=[f"data.root={root}", "data.name=custom"])
    assert len(build_data(cfg).train) == len(images)  # default: kept, and reported when read
    cfg = build_config(overrides=[f"data.root={root}", "data.name=custom", "data.kwargs.on_bad_image=skip"])
    with pytest.warns(UserWarning, match="skipped 1 unreadable image"):
        kept = build_data(cfg).train
    assert len(kept) == len(images) - 1 and str(images[0]) not in {r.path for r in kept}


def test_cli_process_prints_one_line_and_exits_2(tmp_path):
    """The real process: no traceback on stderr, exit code 2, no run folder."""
    proc = run_cli(["-m", "amfor.train", "--config", "market1501", "--data-root", str(tmp_path / "nowhere")],
                   tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().splitlines()[-1].startswith("python -m amfor.train")
    assert str(tmp_path / "nowhere") in proc.stderr and not (tmp_path / "runs").exists()


# --- amfor.test and amfor.export ----------------------------------------------------------------------
@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_root) -> Path:
    """An untrained tiny model saved as a run's last.pt (runs/<date>-synthetic/checkpoints/last.pt)."""
    cfg = build_config(overrides=[f"data.root={tiny_root}", "data.size=tiny", "device=cpu", "test.num_ranked=0",
                                  "data.num_workers=0"])
    model = amfor.create_model(cfg.model.name, 8, num_cameras=4, **DEMO_SWITCHES)
    model.finish_stage1()
    path = tmp_path / "runs" / "20260101-000000-synthetic" / "checkpoints" / "last.pt"
    save_checkpoint({"config": to_dict(cfg), "model_name": cfg.model.name, "num_classes": 8, "num_cameras": 4,
                     "stage1_finished": True, "model": model.state_dict(), "trainer": {"stage": 2, "step": 0}}, path)
    return path


def test_test_command_with_a_missing_dataset_leaves_no_folder(tiny_checkpoint, tmp_path, capsys):
    missing = tmp_path / "moved-away"
    assert evaluate_main(["--checkpoint", str(tiny_checkpoint), "--data-root", str(missing), "--set",
                          "data.name=custom"]) == 2
    assert str(missing) in error_line(capsys, "amfor.test")
    assert list(tiny_checkpoint.parent.parent.iterdir()) == [tiny_checkpoint.parent]  # no test-<date> folder


def test_export_without_the_export_extra_names_it(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else
                        find_spec(name, *a))
    target = tmp_path / "model.onnx"
    assert export_main(["--checkpoint", str(tiny_checkpoint), "--output", str(target)]) == 2
    line = error_line(capsys, "amfor.export")
    assert "onnxscript" in line and 'pip install "amfor[export]"' in line
    assert not target.exists() and not Path(f"{target}.json").exists()


def test_safetensors_weights_without_the_extra_name_it(tiny_root, workdir, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "safetensors" else
                        find_spec(name, *a))
    path = _garbage(workdir / "vit.safetensors")
    assert train_main(tiny_args(tiny_root, f"model.pretrained={path}")) == 2
    line = error_line(capsys)
    assert str(path) in line and 'pip install "amfor[safetensors]"' in line
    assert not (workdir / "runs").exists()


# --- --resume without a path ---------------------------------------------------------------------------
def _fake_run(runs: Path, folder: str, age_s: float, config: dict | None = None) -> Path:
    """runs/<folder>/checkpoints/last.pt, last written `age_s` seconds ago (an amfor checkpoint when `config`)."""
    last = runs / folder / "checkpoints" / "last.pt"
    if config is None:
        last.parent.mkdir(parents=True)
        last.write_bytes(b"")
    else:
        save_checkpoint({"config": config, "model": {}, "trainer": {"stage": 2, "step": 1}}, last)
    t = last.stat().st_mtime - age_s
    os.utime(last, (t, t))
    return last


def test_find_last_checkpoint_takes_the_newest_run_of_exactly_that_name(tmp_path):
    runs = tmp_path / "runs"
    _fake_run(runs, "20260101-000000-market1501", 300)
    newest = _fake_run(runs, "20260102-000000-market1501", 200)
    _fake_run(runs, "20260103-000000-x-market1501", 0)  # run name "x-market1501"
    _fake_run(runs, "20260103-000000-synthetic", 0)
    assert find_last_checkpoint("market1501", runs) == newest
    with pytest.raises(CheckpointError, match="no run named 'dukemtmc'"):
        find_last_checkpoint("dukemtmc", runs)


def test_bare_resume_finds_the_run_of_the_config_s_name(workdir, capsys):
    """`--config market1501 --resume` continues the newest market1501 run with the run's own config; `--set
    name=` names a run the same way; `--output DIR --resume` takes DIR's last checkpoint."""
    ran = to_dict(build_config("market1501", ["train.epochs=7"]))
    _fake_run(workdir / "runs", "20260101-000000-market1501", 100, ran)
    _fake_run(workdir / "runs", "20260101-000000-synthetic", 0, to_dict(build_config(overrides=["train.epochs=3"])))
    assert train_main(["--config", "market1501", "--resume", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "name: market1501" in out and "epochs: 7" in out  # the run's config, not the file's 120 epochs
    assert train_main(["--set", "name=market1501", "--resume", "--print-config"]) == 0
    assert "epochs: 7" in capsys.readouterr().out
    assert train_main(["--output", "runs/20260101-000000-market1501", "--resume", "--print-config"]) == 0
    assert "epochs: 7" in capsys.readouterr().out
    assert train_main(["--config", "dukemtmc", "--resume"]) == 2
    assert "no run named 'dukemtmc'" in error_line(capsys)
    assert train_main(["--config", "market1501", "--resume", "runs/20260101-000000-market1501/checkpoints/last.pt"]) \
        == 2
    assert "--resume PATH continues with the checkpoint's own config" in error_line(capsys)


def test_log_txt_holds_the_lines_logged_before_the_run_folder_existed(tiny_root, tmp_path):
    """The folder is made once the data and model are built; the dataset table and the model line logged before
    still open log.txt."""
    from cli_runs import standin_overrides

    from amfor.engine.runner import train

    out = tmp_path / "run"
    train(build_config(overrides=standin_overrides(tiny_root, **{"output": out, "train.epochs": 1,
                                                                 "train.eval_every": 0})))
    log = (out / "log.txt").read_text()
    assert log.index("=> synthetic") < log.index("model standin_model:create_standin") < log.index("stage 2:")
