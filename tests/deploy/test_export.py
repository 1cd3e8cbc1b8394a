"""amfor.deploy.export on the stand-in: ONNX and torch.export with parity, dynamic batch, no custom op."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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


# -- the single-input graph for trackers and services: BoxMOT's ONNX backend, uint8 input --------------------------
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # what BoxMOT normalises with


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small trained-looking AMFOR at BoxMOT's input size, 256x128, saved as the trainer saves it."""
    from amfor_checkpoint import save_small_amfor

    return save_small_amfor(tmp_path_factory.mktemp("ckpt") / "model.pt")


def export_cli(checkpoint: Path, out: Path, *flags: str) -> dict:
    from amfor.export import main

    assert main(["--checkpoint", str(checkpoint), "--output", str(out), "--no-camids", "--global-only", *flags]) == 0
    return json.loads(Path(f"{out}.json").read_text())


def torch_features(checkpoint: Path, rgb_uint8: np.ndarray) -> np.ndarray:
    """The PyTorch model's global features of uint8 RGB images [B, H, W, 3], normalised in torch with the model's
    own preprocessing (`pretrained_cfg` mean and std), unknown camera."""
    from amfor.data import resolve_data_config
    from amfor.deploy.load import load_for_inference

    model, _, _ = load_for_inference(checkpoint)
    data = resolve_data_config(model)
    x = torch.from_numpy(rgb_uint8).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(data["mean"]).view(1, 3, 1, 1)) / torch.tensor(data["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(x, global_only=True)["features"].numpy()


def boxmot_features(session, frame_bgr: np.ndarray, xyxys: np.ndarray, input_shape=(256, 128)) -> np.ndarray:
    """BoxMOT's ReID path step by step (boxmot/reid/backends/base_backend.py `get_crops` and `get_features`,
    onnx_backend.py `forward`): boxes rounded and clipped to the frame, each BGR crop resized to 256x128 with
    cv2.INTER_LINEAR and turned to RGB, the batch /255 and normalised with ImageNet's mean and std, float32 NCHW fed
    to the FIRST input only, the FIRST output read, then L2-normalised. The boxes here are 128x256 already, so
    cv2.resize (same size) is the identity and the test needs no OpenCV: the crop is checked to be that size."""
    h, w = frame_bgr.shape[:2]
    crops = []
    for box in xyxys:
        x1, y1, x2, y2 = box.round().astype("int")
        x1, y1, x2, y2 = max(0, x1), max(0, y1), min(w, x2), min(h, y2)
        crop = frame_bgr[y1:y2, x1:x2]
        assert crop.shape[:2] == input_shape, "cv2.resize would not be the identity: pick boxes of the input size"
        crops.append(torch.from_numpy(np.ascontiguousarray(crop[..., ::-1])).float().permute(2, 0, 1))  # BGR2RGB
    batch = torch.stack(crops) / 255.0
    batch = (batch - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    feats = session.run([session.get_outputs()[0].name], {session.get_inputs()[0].name: batch.numpy()})[0]
    return feats / np.linalg.norm(feats, axis=-1, keepdims=True)


def a_frame_with_boxes() -> tuple[np.ndarray, np.ndarray]:
    """A BGR frame [360, 480, 3] uint8 and three float xyxy boxes of 128x256 pixels once rounded, as a detector
    gives them."""
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (360, 480, 3), dtype=np.uint8)
    frame[40:300, 200:340] //= 3  # a darker region, so that the crops differ in more than noise
    boxes = np.array([[10.4, 20.3, 138.2, 276.4], [200.2, 40.0, 328.0, 296.1], [351.6, 99.5, 479.6, 355.5]],
                     dtype=np.float32)
    return frame, boxes


def test_the_tracker_graph_takes_boxmot_batches(checkpoint, tmp_path):
    """`--no-camids --global-only --input-norm imagenet`: one input, one output [B, D], fed exactly as BoxMOT's
    ONNX backend feeds a ReID model, gives the PyTorch model's features of the same crops (normalised the model's
    way), to 1e-4."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    spec = export_cli(checkpoint, tmp_path / "reid.onnx", "--input-norm", "imagenet")
    assert spec["inputs"]["images"]["mean"] == list(IMAGENET_MEAN) and spec["inputs"]["images"]["dtype"] == "float32"
    session = ort.InferenceSession(str(tmp_path / "reid.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"] and [o.name for o in session.get_outputs()] == [
        "features"]
    frame, boxes = a_frame_with_boxes()
    got = boxmot_features(session, frame, boxes)
    crops_rgb = np.stack([frame[int(round(y1)):int(round(y2)), int(round(x1)):int(round(x2))][..., ::-1]
                          for x1, y1, x2, y2 in boxes])
    expected = torch_features(checkpoint, crops_rgb)
    assert got.shape == expected.shape == (3, 32)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert np.abs(expected[0] - expected[1]).max() > 1e-2  # the crops' features differ: not a constant output


def test_the_uint8_graph_normalises_inside(checkpoint, tmp_path):
    """`--input-dtype uint8`: uint8 RGB [B, 3, H, W] in, the model's features out, equal to the PyTorch model fed
    the same pixels normalised in torch."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    spec = export_cli(checkpoint, tmp_path / "reid_u8.onnx", "--input-dtype", "uint8")
    assert spec["inputs"]["images"]["dtype"] == "uint8" and spec["parity_max_abs_error"] < 1e-4
    session = ort.InferenceSession(str(tmp_path / "reid_u8.onnx"), providers=["CPUExecutionProvider"])
    (images,) = session.get_inputs()
    assert images.name == "images" and images.type == "tensor(uint8)"
    rgb = np.random.default_rng(1).integers(0, 256, (5, 256, 128, 3), dtype=np.uint8)
    got = session.run(None, {"images": np.ascontiguousarray(rgb.transpose(0, 3, 1, 2))})[0]
    np.testing.assert_allclose(got, torch_features(checkpoint, rgb), atol=1e-4, rtol=0)


def test_uint8_with_imagenet_normalisation_is_refused(checkpoint, tmp_path, capsys):
    from amfor.export import main

    out = tmp_path / "m.onnx"
    code = main(["--checkpoint", str(checkpoint), "--output", str(out), "--input-dtype", "uint8",
                 "--input-norm", "imagenet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "uint8" in err[0] and "imagenet" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_uint8_torch_export(tmp_path):
    """The uint8 input in a torch.export program too: parity on uint8 pixels, and the spec says so."""
    model = StandIn(5, 2)
    spec = export(model, "torch-export", tmp_path / "m.pt2", global_only=True, input_dtype="uint8")
    assert spec["inputs"]["images"]["dtype"] == "uint8" and spec["parity_max_abs_error"] < 1e-5
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    pixels, cams = torch.randint(0, 256, (2, 3, 32, 16), dtype=torch.uint8), torch.tensor([0, 1])
    with torch.no_grad():
        expected = model.eval()((pixels.float() / 255 - 0.5) / 0.5, cams, global_only=True)["features"]
        torch.testing.assert_close(program(pixels, cams), expected)
