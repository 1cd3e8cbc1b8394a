"""Joint transforms keep image, part mask and occlusion map aligned; loaders yield the documented dicts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from amfor.data import (
    FLIP_PAIRS,
    NO_MASK,
    JointErasing,
    OccluderPaste,
    ReIDTransform,
    build_dataset,
    build_test_loader,
    build_train_loader,
    patch_occlusion,
    swap_parts,
)


def label_image(h=64, w=32):
    """Part labels in vertical bands and an image whose red channel encodes the label (label * 25)."""
    mask = np.zeros((h, w), np.int64)
    for k in range(9):
        mask[:, k * w // 9:(k + 1) * w // 9] = k
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 0] = mask * 25
    return Image.fromarray(rgb), mask


def test_geometric_steps_keep_image_and_mask_aligned():
    torch.manual_seed(0)
    img, mask = label_image()
    t = ReIDTransform((64, 32), train=True, flip=0.5, pad=4, erasing=0.0, occluder=0.0)
    swapped = 0
    for _ in range(20):
        x, m, occ = t(img, mask)
        red = ((x[0] * 0.5 + 0.5) * 255 / 25).round().long()
        inside = m > 0
        direct = (red[inside] == m[inside]).float().mean()
        flipped = (red[inside] == swap_parts(m, FLIP_PAIRS)[inside]).float().mean()
        assert max(direct, flipped) > 0.97 and not occ.any()
        swapped += int(flipped > direct)
    assert 0 < swapped < 20  # both flipped (labels swapped) and unflipped samples occurred


def test_erasing_and_occluders_mark_occlusion_and_clear_mask():
    torch.manual_seed(1)
    img, mask = label_image()
    x, m, occ = ReIDTransform((64, 32), train=True, erasing=1.0, occluder=1.0, pad=0, flip=0)(img, mask)
    assert occ.any() and (m[occ] == 0).all() and (m[~occ] == torch.as_tensor(mask)[~occ]).all()
    base = torch.rand(3, 20, 10)
    for op in (OccluderPaste(p=1.0, source=lambda: torch.rand(3, 30, 15)), JointErasing(p=1.0)):
        out, m2, o2 = op(base, torch.ones(20, 10, dtype=torch.long), torch.zeros(20, 10, dtype=torch.bool))
        assert o2.any() and torch.equal(out[:, ~o2], base[:, ~o2]) and (m2[o2] == 0).all()


def test_no_mask_gives_sentinel_and_test_transform_is_deterministic():
    img, _ = label_image()
    t = ReIDTransform((32, 16), train=False)
    a, m, occ = t(img, None)
    assert a.shape == (3, 32, 16) and (m == NO_MASK).all() and not occ.any()
    assert torch.equal(a, t(img, None)[0])


def test_patch_occlusion_grid():
    occ = torch.zeros(2, 32, 16, dtype=torch.bool)
    occ[0, 16:] = True
    grid = patch_occlusion(occ, patch=8)
    assert grid.shape == (2, 4, 2) and grid[0, 2:].all() and not grid[0, :2].any() and not grid[1].any()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return build_dataset("synthetic", str(tmp_path_factory.mktemp("syn")), size="tiny", seed=0)


def test_train_and_test_loaders(tiny_data):
    dl = build_train_loader(tiny_data, size=(64, 32), batch_size=8, num_instances=4, num_workers=0, occluder=0.5)
    batch = next(iter(dl))
    assert batch["img"].shape == (8, 3, 64, 32) and batch["mask"].shape == (8, 64, 32)
    assert batch["occlusion"].dtype == torch.bool and batch["mask"].max() <= 8 and len(batch["path"]) == 8
    assert len(set(batch["pid"].tolist())) == 2
    tl = build_test_loader(tiny_data.query, size=(64, 32), batch_size=4, num_workers=0)
    paths = [p for b in tl for p in b["path"]]
    assert paths == [r.path for r in tiny_data.query]


def test_unreadable_image_named_or_skipped(tmp_path):
    from amfor.data import ImageRecord, ReIDImageDataset

    good = tmp_path / "0001_c1s1_000001_00.jpg"
    Image.new("RGB", (16, 32)).save(good)
    bad = tmp_path / "0002_c1s1_000002_00.jpg"
    bad.write_bytes(b"broken")
    recs = [ImageRecord(str(bad), 1, 0), ImageRecord(str(good), 0, 0)]
    with pytest.raises(OSError, match=bad.name):
        ReIDImageDataset(recs)[0]
    with pytest.warns(UserWarning, match="unreadable"):
        assert ReIDImageDataset(recs, on_bad_image="skip")[0]["path"] == str(good)


class MeanPixel(torch.nn.Module):
    """A model whose features are the images' mean pixel per channel, with a timm-style `pretrained_cfg`."""

    input_size = (16, 8)
    pretrained_cfg = {"input_size": (3, 16, 8), "mean": (0.2, 0.4, 0.6), "std": (0.1, 0.2, 0.3),
                      "interpolation": "nearest"}

    def forward(self, images, camids=None, global_only=False):
        return {"features": images.mean((2, 3))}


def flat_images(tmp_path, colours):
    from amfor.data import ImageRecord

    records = []
    for k, colour in enumerate(colours):
        path = tmp_path / f"{k:04d}_c1s1_{k:06d}_00.png"
        Image.new("RGB", (5, 11), colour).save(path)
        records.append(ImageRecord(str(path), k, -1))  # camera unknown
    return records


def test_loaders_and_extraction_normalise_as_the_models_pretrained_cfg_says(tmp_path):
    """Size, mean, std and interpolation come from the model's `pretrained_cfg`, in the loaders and in feature
    extraction; a model without one gets the ReID defaults (mean = std = 0.5) at its input size."""
    from amfor.data import resolve_data_config
    from amfor.evaluation.protocol import extract

    colours = [(255, 0, 51), (102, 204, 0)]
    records = flat_images(tmp_path, colours)
    cfg = resolve_data_config(MeanPixel())
    assert cfg == {"size": (16, 8), "mean": (0.2, 0.4, 0.6), "std": (0.1, 0.2, 0.3), "interpolation": "nearest"}
    expected = (torch.tensor(colours, dtype=torch.float32) / 255 - torch.tensor(cfg["mean"])) / torch.tensor(cfg["std"])
    batch = next(iter(build_test_loader(records, batch_size=2, num_workers=0, **cfg)))
    assert batch["img"].shape == (2, 3, 16, 8)
    torch.testing.assert_close(batch["img"].mean((2, 3)), expected)
    train = next(iter(build_train_loader(records, batch_size=2, num_instances=1, num_workers=0, flip=0.0, pad=0,
                                         erasing=0.0, **cfg)))
    torch.testing.assert_close(train["img"].mean((2, 3)).sort(0).values, expected.sort(0).values)
    feats = extract(MeanPixel(), records, torch.device("cpu"), (16, 8), 2, 0, global_only=True)["features"]
    torch.testing.assert_close(feats, expected)

    class Plain(MeanPixel):
        pretrained_cfg = None

    assert resolve_data_config(Plain()) == {"size": (16, 8), "mean": (0.5,) * 3, "std": (0.5,) * 3,
                                            "interpolation": "bilinear"}
    with pytest.raises(ValueError, match="interpolation must be one of"):
        resolve_data_config(type("Odd", (MeanPixel,), {"pretrained_cfg": {"interpolation": "lanczos9"}})())
