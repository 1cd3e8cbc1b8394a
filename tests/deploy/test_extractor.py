"""`amfor.Extractor`: the evaluation's features for a folder, the same features whatever the input kind, crops of a
frame as trackers ask, cameras, reduced precision, and bad inputs named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from extract_support import image_folder, small_amfor
from PIL import Image

import amfor
from amfor.data import ImageRecord
from amfor.deploy.feature_file import FeatureSet
from amfor.evaluation.protocol import extract

CAMIDS = [0, 1, 2, 0, -1, 1]  # one per image of the folder, sorted


@pytest.fixture(scope="module")
def model():
    return small_amfor()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("images")
    return root, [str(root / p) for p in image_folder(root)["good"]]


@pytest.fixture(scope="module")
def extractor(model):
    return amfor.Extractor(model, device="cpu", batch_size=4)


def test_features_of_a_folder_equal_the_evaluations(model, folder, extractor):
    _, paths = folder
    records = [ImageRecord(p, 0, c) for p, c in zip(paths, CAMIDS, strict=True)]
    want = extract(model, records, torch.device("cpu"), model.input_size, batch_size=4, num_workers=0)
    got = extractor(paths, camids=CAMIDS, parts=True)
    assert isinstance(got, FeatureSet) and got.paths == paths and got.camids.tolist() == CAMIDS
    assert torch.equal(got.parts, want["features"]) and torch.equal(got.visibility, want["visibility"])
    torch.testing.assert_close(got.features, want["features"][:, 0], rtol=0, atol=1e-6)
    glob = extractor(paths, camids=CAMIDS)  # the global-only forward
    assert glob.dtype == torch.float32 and glob.device.type == "cpu" and glob.shape == want["features"][:, 0].shape
    torch.testing.assert_close(glob, want["features"][:, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(glob.norm(dim=1), torch.ones(len(paths)))
    workers = amfor.Extractor(model, device="cpu", batch_size=4, num_workers=1)  # images read in another process
    assert torch.equal(workers(paths, camids=CAMIDS), glob)


def test_every_input_kind_gives_the_same_features(folder, extractor):
    _, paths = folder
    paths, camids = paths[:4], CAMIDS[:4]
    want = extractor(paths, camids)
    pil = [Image.open(p) for p in paths]  # lazily loaded, palette or RGB: converted as the loader converts
    rgb = [np.array(Image.open(p).convert("RGB")) for p in paths]
    kinds = {"PIL": (pil, {}), "RGB arrays": (rgb, {}),
             "BGR arrays": ([np.ascontiguousarray(a[..., ::-1]) for a in rgb], {"bgr": True}),
             "uint8 tensors": ([torch.from_numpy(a).permute(2, 0, 1) for a in rgb], {}),
             "BGR uint8 tensors": ([torch.from_numpy(a[..., ::-1].copy()).permute(2, 0, 1) for a in rgb],
                                   {"bgr": True}),
             "mixed": ([paths[0], pil[1], rgb[2], *paths[3:]], {})}
    for kind, (inputs, flags) in kinds.items():
        assert torch.equal(extractor(inputs, camids, **flags), want), kind
    assert not torch.equal(extractor([np.ascontiguousarray(a[..., ::-1]) for a in rgb], camids), want)


def test_tensor_batches_at_the_models_size(model, extractor):
    """A uint8 batch [B, 3, H, W] is normalised here; a float batch is taken as normalised by the caller with the
    model's mean and std."""
    h, w = model.input_size
    images = torch.randint(0, 256, (3, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(model.pretrained_cfg["mean"])[:, None, None]
    std = torch.tensor(model.pretrained_cfg["std"])[:, None, None]
    normalised = (images.float() / 255 - mean) / std
    as_arrays = extractor([im.permute(1, 2, 0).numpy() for im in images], [0, 1, 2])
    torch.testing.assert_close(extractor(images, [0, 1, 2]), as_arrays, rtol=0, atol=1e-6)
    torch.testing.assert_close(extractor(normalised, [0, 1, 2]), as_arrays, rtol=0, atol=1e-6)
    with torch.no_grad():
        direct = model(normalised, torch.tensor([0, 1, 2]), global_only=True)["features"]
    assert torch.equal(extractor(normalised, [0, 1, 2]), direct)


def frame_and_boxes():
    rng = np.random.default_rng(3)
    frame = rng.integers(0, 256, (120, 200, 3), dtype=np.uint8)  # BGR, as cv2.imread gives it
    boxes = np.array([[10.4, 5.0, 50.6, 100.2, 0.9], [150.0, 60.0, 230.0, 140.0, 0.5], [-5, -5, 30, 40, 0.7]])
    crops = [frame[5:101, 10:51], frame[60:120, 150:200], frame[0:40, 0:30]]  # corners outwards, clipped
    return frame, boxes, [np.ascontiguousarray(c[..., ::-1]) for c in crops]


def test_from_frame_equals_extracting_the_crops(extractor):
    frame, boxes, crops_rgb = frame_and_boxes()
    want = extractor(crops_rgb)
    assert torch.equal(extractor.from_frame(frame, boxes), want)
    assert torch.equal(extractor.from_frame(np.ascontiguousarray(frame[..., ::-1]), boxes[:, :4], bgr=False), want)
    got = extractor.get_features(boxes[:, :4], frame)  # BoxMOT's call: (xyxys, BGR image) -> numpy [K, D]
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and np.array_equal(got, want.numpy())
    none = extractor.from_frame(frame, np.zeros((0, 4)))
    assert none.shape == (0, want.shape[1])


def test_an_empty_box_is_an_error_naming_it(extractor):
    frame, boxes, _ = frame_and_boxes()
    outside = np.concatenate([boxes[:, :4], [[250.0, 10.0, 300.0, 50.0]]])
    with pytest.raises(ValueError, match=r"box 3 \[250.0, 10.0, 300.0, 50.0\].*empty inside the 200x120 frame"):
        extractor.from_frame(frame, outside)
    with pytest.raises(ValueError, match="box 0 .* is empty"):
        extractor.from_frame(frame, [[40, 30, 40, 60]])


def test_cameras_unknown_by_default_and_beyond_the_model(model, folder, extractor):
    _, paths = folder
    unknown = extractor(paths)
    assert torch.equal(extractor(paths, [-1] * len(paths)), unknown)
    assert torch.equal(extractor(paths, [model.num_cameras + 4] * len(paths)), unknown)
    assert not torch.equal(extractor(paths, [0] * len(paths)), unknown)


def test_reduced_precision_runs_under_autocast(model, folder):
    _, paths = folder
    fp32 = amfor.Extractor(model, device="cpu")(paths, CAMIDS)
    bf16 = amfor.Extractor(model, device="cpu", dtype=torch.bfloat16)(paths, CAMIDS)
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)
    torch.testing.assert_close(bf16.norm(dim=1), torch.ones(len(paths)))
    assert float((bf16 * fp32).sum(1).min()) > 0.98


def test_bad_inputs_are_one_error_naming_them(model, folder, extractor, tmp_path):
    root, paths = folder
    broken = root / "cam_b" / "0005_c1s1_000001_01.jpg"
    with pytest.raises(OSError, match=f"cannot read image {broken}"):
        extractor([paths[0], broken])
    with pytest.raises(OSError, match=f"cannot read image {tmp_path / 'nowhere.jpg'}"):
        extractor([tmp_path / "nowhere.jpg"])
    with pytest.raises(ValueError, match=r"input 1: an image array must be uint8 \[H, W, 3\], got float32"):
        extractor([np.zeros((8, 4, 3), np.uint8), np.zeros((8, 4, 3), np.float32)])
    with pytest.raises(ValueError, match=r"a float image tensor must be \[B, 3, 128, 64\]"):
        extractor(torch.zeros(2, 3, 64, 32))
    with pytest.raises(ValueError, match="camids: one per image, got 1 for 2 images"):
        extractor(paths[:2], camids=[0])
    with pytest.raises(ValueError, match="input 0: expected an image path, a PIL image"):
        extractor([3.5])
