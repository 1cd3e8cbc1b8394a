"""amfor.deploy.export on the stand-in: ONNX and torch.export with parity, dynamic batch, no custom op."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from standin_model import StandIn

from amfor.deploy.export import custom_ops_in, export


def test_torch_export_parity_and_spec(tmp_path):
    torch.manual_seed(0)
    model = StandIn(5, 2)
    spec = export(model, "torch-export", tmp_path / "m.pt2")
    assert spec["parity_max_abs_error"] < 1e-5  # checked on batch 3, exported with batch 2: dynamic batch
    assert spec["outputs"] == {"features": {"dtype": "float32", "shape": ["B", 3, 16]},
                               "visibility": {"dtype": "float32", "shape": ["B", 3]}}
    assert json.loads(Path(str(tmp_path / "m.pt2") + ".json").read_text()) == spec
    assert custom_ops_in(torch.export.load(str(tmp_path / "m.pt2"))) == []


def test_onnx_global_only(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = StandIn(5, 2)
    spec = export(model, "onnx", tmp_path / "m.onnx", global_only=True)
    assert list(spec["outputs"]) == ["features"] and spec["outputs"]["features"]["shape"] == ["B", 16]
    assert spec["parity_max_abs_error"] < 1e-5
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    assert [i.name for i in session.get_inputs()] == ["images", "camids"]


def test_custom_ops_are_detected():
    class UsesCustom(torch.nn.Module):
        def forward(self, x):
            return torch.ops.amfor.masked_gather(x, torch.zeros(x.shape[0], 1, dtype=torch.long), None)

    import amfor.ops  # noqa: F401  (registers torch.ops.amfor.*)
    try:
        program = torch.export.export(UsesCustom(), (torch.randn(2, 3, 4),))
    except Exception:  # noqa: BLE001 - the op's schema may not allow this call; then nothing to check
        pytest.skip("torch.ops.amfor.masked_gather not exportable with these arguments")
    assert any("amfor" in op for op in custom_ops_in(program))


def small_amfor(num_cameras: int = 3):
    """A small AMFOR with cameras (SIE, camera centring), trained cameras 0 and 1 only, after one training step."""
    import amfor

    torch.manual_seed(0)
    model = amfor.create_model("amfor_vit_tiny_patch16", num_classes=4, num_cameras=num_cameras, img_size=(64, 32),
                               embed_dim=32, depth=3, num_heads=2, text=False, amff=False, hpr=False,
                               part_recon=False, recon_fill=False, amgd=False, part_heads=2, part_ffn_dim=64)
    model.set_train_cameras([0, 1])
    model.train()(torch.randn(4, 3, 64, 32), torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1]))
    return model.eval()


@pytest.mark.parametrize("with_camids", [True, False])
def test_the_export_takes_unknown_cameras_and_the_models_preprocessing(tmp_path, with_camids):
    """camids -1 (or no camids input at all) is an unknown camera in the exported graph as in eager mode; the
    spec records the model's `pretrained_cfg` mean and std."""
    model = small_amfor()
    path = tmp_path / "m.pt2"
    spec = export(model, "torch-export", path, camids=with_camids)
    assert spec["parity_max_abs_error"] < 1e-4
    assert spec["inputs"]["images"]["mean"] == list(model.pretrained_cfg["mean"])
    assert spec["inputs"]["images"]["std"] == list(model.pretrained_cfg["std"])
    assert ("camids" in spec["inputs"]) == with_camids
    program = torch.export.load(str(path)).module()
    images = torch.randn(3, 3, 64, 32)
    close = dict(atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        unknown = model(images)["features"]
        if not with_camids:
            torch.testing.assert_close(program(images)[0], unknown, **close)
            return
        cams = torch.tensor([-1, 2, 1])  # unknown, never seen in training, seen
        got = program(images, cams)[0]
    torch.testing.assert_close(got, model(images, cams)["features"], **close)
    torch.testing.assert_close(got[:2], unknown[:2], **close)
    assert not torch.allclose(got[2], unknown[2], **close)
