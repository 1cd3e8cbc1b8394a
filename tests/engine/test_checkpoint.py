"""amfor.engine.checkpoint: atomic writes, safe loads, clear errors, RNG states."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from amfor.engine import checkpoint as ck
from amfor.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def test_round_trip_and_no_temporary_left(tmp_path):
    path = save_checkpoint({"model": {"w": torch.arange(3.0)}, "step": 4}, tmp_path / "ck" / "last.pt")
    state = load_checkpoint(path)
    assert state["format"] == ck.FORMAT and state["step"] == 4 and torch.equal(state["model"]["w"], torch.arange(3.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = save_checkpoint({"step": 1}, tmp_path / "last.pt")

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_truncated_corrupt_foreign_and_missing_files(tmp_path):
    good = save_checkpoint({"model": {"w": torch.randn(1000)}}, tmp_path / "good.pt")
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 10)
    torch.save({"pos_embed": torch.zeros(2)}, tmp_path / "timm.pth")
    for name in ("truncated.pt", "garbage.pt"):
        with pytest.raises(CheckpointError, match="cannot read checkpoint"):
            load_checkpoint(tmp_path / name)
    with pytest.raises(CheckpointError, match="not an amfor checkpoint.*model.pretrained"):
        load_checkpoint(tmp_path / "timm.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


class NotAllowed:
    pass


def test_pickled_objects_are_refused(tmp_path):
    """weights_only=True: a checkpoint that would run arbitrary code on load is rejected, not executed."""
    torch.save({"format": ck.FORMAT, "version": 1, "payload": NotAllowed()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")


def test_model_mismatch_names_the_keys(tmp_path):
    state = {"model": torch.nn.Linear(2, 3).state_dict(), "model_name": "other", "num_classes": 3}
    with pytest.raises(CheckpointError, match=r"checkpoint model 'other'.*missing \['0.weight'"):
        ck.load_model_state(torch.nn.Sequential(torch.nn.Linear(2, 3)), state)


def test_rng_states_round_trip_through_a_safe_load(tmp_path):
    ck.seed_everything(3)
    state = ck.rng_state()
    save_checkpoint({"rng": state}, tmp_path / "r.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    ck.set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]
