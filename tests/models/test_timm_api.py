"""AMFOR as a timm model: a headless `create_model(name, num_classes=0)`, `forward_features` / `forward_head`,
`num_features`, `reset_classifier`, `pretrained_cfg`; and the cameras: None / -1 / never seen in training."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import amfor
from amfor.models import AMFOR


def test_a_headless_model_extracts_features_and_reset_classifier_makes_it_trainable():
    torch.manual_seed(0)
    model = amfor.create_model("amfor_vit_tiny_patch16", num_classes=0)
    H, W = model.input_size
    images = torch.randn(4, 3, H, W)
    assert model.num_features == 192 and isinstance(model.get_classifier(), torch.nn.Identity)
    assert not any(".classifier." in n for n, _ in model.named_parameters())  # the BNNecks' identity classifiers
    assert model.granularity_necks.weight.shape[1] == 0 and model.text.prompts.context.shape[0] == 0
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no identity, no text bank to build: nothing to warn about
        out = model(images)
        tokens = model.forward_features(images)
    assert out["features"].shape == (4, 9, 192) and torch.isfinite(out["features"]).all()
    assert tokens.shape == (4, 1 + model.backbone.num_patches, 192)
    feat = model.forward_head(tokens, pre_logits=True)
    torch.testing.assert_close(F.normalize(feat, dim=-1), model(images, global_only=True)["features"])
    torch.testing.assert_close(model.forward_head(tokens), feat)  # headless: the feature is the output
    with pytest.raises(ValueError, match=r"headless feature extractor \(num_classes=0\).*reset_classifier"):
        model.train()(images, torch.tensor([0, 0, 1, 1]))

    model.reset_classifier(5)
    assert model.num_classes == 5 and model.get_classifier().weight.shape == (5, 192)
    assert model.text.prompts.context.shape[0] == 5 and not model.text.ready
    with pytest.warns(UserWarning, match="text bank is empty"):
        losses = model.train()(images, torch.tensor([0, 0, 4, 4]), None)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and model.get_classifier().weight.grad is not None
    assert model.eval().forward_head(model.forward_features(images)).shape == (4, 5)
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), torch.nn.Identity) and model.text.bank.shape[0] == 0


def test_pretrained_cfg_is_the_registry_entrys_with_the_models_input_size():
    model = amfor.create_model("amfor_vit_tiny_patch16", num_classes=3)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, *model.input_size) == (3, 128, 64)
    assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5) and cfg["interpolation"] == "bilinear"
    assert model.default_cfg is cfg
    for key in ("first_conv", "classifier"):  # timm's tools find the modules these name
        assert model.get_submodule(cfg[key]) is not None
    small = amfor.create_model("amfor_vit_tiny_patch16", num_classes=3, img_size=(64, 32))
    assert small.pretrained_cfg["input_size"] == (3, 64, 32) and small.input_size == (64, 32)
    assert amfor.create_model("amfor_vit_base_patch16", num_classes=0, depth=2, text=False, amff=False,
                              parts=False, teacher_student=False, amgd=False, part_recon=False,
                              hpr=False).pretrained_cfg["input_size"] == (3, 256, 128)


def test_unknown_and_unseen_cameras_get_the_seen_cameras_means(small, batch):
    """camids=None, camid -1 and a camera training never saw give the same features (the seen cameras' mean SIE
    vector and centring mean), all different from a seen camera's."""
    model = small.model(camera_centering=True)
    model.set_train_cameras([0, 1])
    b = dict(batch, camid=torch.tensor([0, 1, 1, 0]))
    model.train()(b["img"], b["pid"], b["camid"], b["mask"], b["occlusion"])["loss"].backward()
    model.eval()
    img = b["img"]
    unknown = model(img)["features"]
    for cams in (torch.full((4,), -1), torch.full((4,), 2)):
        torch.testing.assert_close(model(img, cams)["features"], unknown)
    assert not torch.allclose(model(img, torch.zeros(4, dtype=torch.long))["features"], unknown)
    mixed = model(img, torch.tensor([0, -1, 2, 1]))["features"]
    torch.testing.assert_close(mixed[1:3], unknown[1:3])
    with pytest.raises(ValueError, match=r"training cameras must lie in \[0, 3\)"):
        model.set_train_cameras([3])


def test_a_checkpoint_without_the_seen_cameras_loads_with_every_camera_seen(small):
    model = small.model()
    model.set_train_cameras([0])
    state = {k: v for k, v in model.state_dict().items() if k != "cameras_seen"}
    model.load_state_dict(state)  # strict
    assert model.cameras_seen.tolist() == [True] * small.num_cameras
    assert AMFOR(small.num_classes, 0, **small.config).cameras_seen is None
