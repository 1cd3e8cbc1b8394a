"""The slim weights file: `python -m amfor.export --format weights` on a checkpoint, loaded back by `load_model`,
gives the checkpoint's eval features exactly, holds no training-only tensor, reads no pretrained file, and a
foreign or incomplete file is one clear error naming it."""

from __future__ import annotations

import json

import pytest
import torch
from extract_support import KWARGS, NAME, NUM_CAMERAS, NUM_CLASSES, small_amfor, write_checkpoint
from safetensors import safe_open
from safetensors.torch import save_file
from standin_model import StandIn

import amfor
from amfor.deploy.feature_file import FeatureSet, save_features
from amfor.deploy.load import load_model
from amfor.deploy.weights import WeightsError, load_weights, save_weights
from amfor.engine.checkpoint import CheckpointError, load_checkpoint
from amfor.export import main as export_main
from amfor.models.registry import pretrained_cfg

# tensors only training reads: identity classifiers, the HPR patch decoder, AMGD, the prompts and the text tower
TRAINING_ONLY = ("global_neck.classifier.weight", "patch_decoder.", "amgd.", "text.prompts.", "text.encoder.",
                 "granularity_necks.", "foreground_neck.", "teacher_centering.")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(checkpoint, its weights file written by the export command next to it)."""
    root = tmp_path_factory.mktemp("weights")
    checkpoint = write_checkpoint(small_amfor(), root / "run" / "checkpoints" / "best.pt")
    assert export_main(["--checkpoint", str(checkpoint), "--format", "weights"]) == 0
    return checkpoint, checkpoint.with_suffix(".safetensors")


@pytest.fixture(scope="module")
def loaded(exported):
    """The eval models of the checkpoint and of its weights file."""
    return load_model(exported[0]), load_model(exported[1])


def features(model, images, camids, global_only=False):
    with torch.no_grad():
        return model(images, camids, global_only=True) if global_only else model(images, camids)


def test_the_weights_file_gives_the_checkpoints_eval_features_exactly(loaded):
    from_checkpoint, from_weights = loaded
    assert not from_weights.training
    images = torch.randn(5, 3, *from_checkpoint.input_size, generator=torch.Generator().manual_seed(1))
    for camids in (torch.tensor([0, 1, 2, 0, 1]), torch.tensor([-1, 0, -1, 2, 1]), None):
        want, got = features(from_checkpoint, images, camids), features(from_weights, images, camids)
        assert torch.equal(want["features"], got["features"]) and torch.equal(want["visibility"], got["visibility"])
        assert torch.equal(features(from_checkpoint, images, camids, True)["features"],
                           features(from_weights, images, camids, True)["features"])


def test_the_weights_file_holds_the_eval_path_only(exported):
    checkpoint, weights = exported
    state = load_checkpoint(checkpoint)["model"]
    with safe_open(str(weights), framework="pt") as f:
        keys = set(f.keys())
    assert keys < set(state)
    for prefix in TRAINING_ONLY:
        assert any(k.startswith(prefix) for k in state), prefix  # the checkpoint has it...
        assert not any(k.startswith(prefix) for k in keys), prefix  # ...the weights file does not
    for kept in ("backbone.patch_embed.proj.weight", "text.bank", "text.bank_ready", "global_neck.bn.running_mean",
                 "part_reconstructor.predict.weight", "camera_centering.running_mean", "cameras_seen"):
        assert kept in keys
    assert weights.stat().st_size < 0.8 * sum(t.numel() * t.element_size() for t in state.values())


def test_the_metadata_names_the_model_its_kwargs_and_its_preprocessing(exported):
    _, weights = exported
    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata()
    cfg = pretrained_cfg()  # the variants' preprocessing; the tiny one's input is 128x64
    assert meta["format"] == "amfor-weights" and meta["model_name"] == NAME
    assert json.loads(meta["model_kwargs"]) == KWARGS
    assert (int(meta["num_classes"]), int(meta["num_cameras"])) == (NUM_CLASSES, NUM_CAMERAS)
    data = json.loads(meta["data_config"])
    assert data == {"size": [128, 64], "mean": list(cfg["mean"]), "std": list(cfg["std"]),
                    "interpolation": cfg["interpolation"]}
    assert meta["amfor_version"] == amfor.__version__ and meta["source"] == "best.pt"


def test_loading_reads_no_pretrained_or_clip_file(tmp_path, exported, loaded):
    """A checkpoint trained from CLIP weights that have gone since: its weights file loads."""
    state = load_checkpoint(exported[0])
    state["config"]["model"]["kwargs"]["clip_weights"] = str(tmp_path / "gone" / "ViT-B-16.pt")
    state["config"]["model"]["pretrained"] = str(tmp_path / "gone" / "vit.pth")
    torch.save(state, tmp_path / "last.pt")
    out = tmp_path / "slim.safetensors"
    assert export_main(["--checkpoint", str(tmp_path / "last.pt"), "--format", "weights", "--output", str(out)]) == 0
    with safe_open(str(out), framework="pt") as f:
        assert json.loads(f.metadata()["model_kwargs"])["clip_weights"] is None
    images = torch.randn(2, 3, 128, 64)
    torch.testing.assert_close(features(load_model(out), images, None)["features"],
                               features(loaded[0], images, None)["features"], rtol=0, atol=0)


def test_a_model_of_a_factory_round_trips(tmp_path):
    """The stand-in by its `package.module:function` name: its classifier and prompts are left out."""
    torch.manual_seed(0)
    model = StandIn(5, 2).eval()
    save_weights(model, tmp_path / "s.safetensors", "standin_model:create_standin", {}, num_cameras=2)
    back = load_weights(tmp_path / "s.safetensors")
    images, camids = torch.randn(3, 3, 32, 16), torch.tensor([0, 1, 0])
    assert torch.equal(features(model, images, camids)["features"], features(back, images, camids)["features"])
    with safe_open(str(tmp_path / "s.safetensors"), framework="pt") as f:
        assert not {"classifier.weight", "prompts", "text_bank"} & set(f.keys())


def test_foreign_files_are_one_error_naming_them(tmp_path, exported):
    feats = save_features(tmp_path / "feats.safetensors", FeatureSet(torch.zeros(1, 4), ["a.jpg"]))
    with pytest.raises(WeightsError, match=f"{feats}.*features file"):
        load_model(feats)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(WeightsError, match=f"{tmp_path / 'plain.safetensors'}.*not an amfor weights file"):
        load_model(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match=f"cannot read weights file {tmp_path / 'junk.safetensors'}"):
        load_model(tmp_path / "junk.safetensors")
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07onnx")
    with pytest.raises(CheckpointError, match=str(tmp_path / "model.onnx")):
        load_model(tmp_path / "model.onnx")
    with pytest.raises(WeightsError, match=f"weights file {tmp_path / 'gone.safetensors'} does not exist"):
        load_model(tmp_path / "gone.safetensors")


def test_a_weights_file_missing_an_eval_tensor_is_refused(tmp_path, exported):
    _, weights = exported
    with safe_open(str(weights), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    del tensors["parts_neck.bn.running_var"]
    save_file(tensors, str(tmp_path / "cut.safetensors"), metadata=meta)
    with pytest.raises(WeightsError, match=r"cut.safetensors lacks .*parts_neck\.bn\.running_var"):
        load_weights(tmp_path / "cut.safetensors")


def test_export_weights_bad_output_is_exit_2_and_writes_nothing(exported, tmp_path, capsys):
    checkpoint, _ = exported
    target = tmp_path / "model.bin"
    assert export_main(["--checkpoint", str(checkpoint), "--format", "weights", "--output", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(target) in err[0] and ".safetensors" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_create_model_takes_it_as_pretrained_backbone_weights(exported, loaded):
    """A new model (other identities, e.g. to fine-tune on another dataset) starts from the shared file's encoder."""
    _, weights = exported
    trained = loaded[1]
    fresh = amfor.create_model(NAME, 7, num_cameras=NUM_CAMERAS, pretrained=str(weights), **KWARGS)
    want, got = trained.backbone.state_dict(), fresh.backbone.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
