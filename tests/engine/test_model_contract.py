"""The model contract the engine's tests rely on, held by AMFOR and by the stand-in that stands for it there: an
unknown camera is camids None or -1, in eval and in training, and both spellings give the same features."""

from __future__ import annotations

import pytest
import torch
from standin_model import create_standin

from amfor.models import create_model


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "standin":
        return create_standin(4, 3)
    return create_model("amfor_vit_tiny_patch16", 4, 3, depth=2, fusion_points=(1,), text=False)


@pytest.mark.parametrize("name", ["standin", "amfor"])
def test_an_unknown_camera_is_none_or_minus_one_in_eval_and_training(name):
    model = build(name)
    images = torch.randn(4, 3, *model.input_size)
    model.eval()
    with torch.no_grad():
        known = model(images, torch.tensor([0, 1, 2, 0]))["features"]
        none, minus_one = model(images)["features"], model(images, torch.full((4,), -1))["features"]
    torch.testing.assert_close(none, minus_one)
    assert not torch.allclose(none, known)  # the camera is read where it is known
    model.train()
    out = model(images, torch.tensor([0, 1, 2, 3]), occlusion=torch.zeros(4, *model.input_size))
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
