"""Occluded-REID, Partial-REID, P-DukeMTMC-reID, MSMT17 and custom-folder parsers on fake copies."""

from __future__ import annotations

import pytest

from amfor.data import DatasetWarning, build_dataset


def test_occluded_reid_query_cam0_gallery_cam1(tmp_path, fake):
    ddir = tmp_path / "Occluded_REID"
    for pid in (1, 2, 17):
        for k in range(1, 4):
            fake.touch(ddir / "occluded_body_images" / f"{pid:03d}" / f"{pid:03d}_{k:02d}.tif")
            fake.touch(ddir / "whole_body_images" / f"{pid:03d}" / f"{pid:03d}_{k:02d}.tif")
    data = build_dataset("occluded_reid", str(tmp_path))
    assert data.test_only and data.train == [] and data.num_train_pids == 0
    assert len(data.query) == 9 and {r.camid for r in data.query} == {0}
    assert len(data.gallery) == 9 and {r.camid for r in data.gallery} == {1}
    assert sorted({r.pid for r in data.query}) == [1, 2, 17]


def test_partial_reid_pid_from_name(tmp_path, fake):
    ddir = tmp_path / "Partial_REID"
    for pid in (1, 60):
        for k in range(1, 6):
            fake.touch(ddir / "partial_body_images" / f"{pid:03d}_{k:02d}.jpg")
            fake.touch(ddir / "whole_body_images" / f"{pid:03d}_{k:02d}.jpg")
    fake.touch(ddir / "whole_body_images" / "readme.jpg")
    with pytest.warns(DatasetWarning, match="1 file name"):
        data = build_dataset("partial_reid", str(tmp_path))
    assert (len(data.query), len(data.gallery)) == (10, 10)
    assert {r.pid for r in data.gallery} == {1, 60} and {r.camid for r in data.query} == {0}


def test_p_dukemtmc_train_and_test_cameras(tmp_path, fake):
    ddir = tmp_path / "P-DukeMTMC-reID"
    layout = {("train", "occluded"): [5, 5, 9], ("train", "whole"): [5, 9, 9, 2],
              ("test", "occluded"): [30, 31], ("test", "whole"): [30, 31, 31]}
    for (split, kind), pids in layout.items():
        for k, pid in enumerate(pids):
            fake.touch(ddir / split / f"{kind}_body_images" / f"{pid:04d}" / f"{pid:04d}_c1_f{k:07d}.jpg")
    data = build_dataset("p_dukemtmc", str(tmp_path))
    assert sorted((r.pid, r.camid) for r in data.train) == [(0, 1), (1, 0), (1, 0), (1, 1), (2, 0), (2, 1), (2, 1)]
    assert [(r.pid, r.camid) for r in data.query] == [(30, 0), (31, 0)]
    assert sorted((r.pid, r.camid) for r in data.gallery) == [(30, 1), (31, 1), (31, 1)]


def test_msmt17_lists(tmp_path):
    ddir = tmp_path / "MSMT17"
    (ddir / "train").mkdir(parents=True)
    (ddir / "test").mkdir()
    (ddir / "list_train.txt").write_text("0000/0000_000_01_0303morning_0015_0.jpg 0\n"
                                         "0001/0001_001_15_0303morning_0016_0.jpg 1\n")
    (ddir / "list_val.txt").write_text("0000/0000_002_03_0303morning_0017_0.jpg 0\nbroken line\n")
    (ddir / "list_query.txt").write_text("0007/0007_000_02_0303noon_0001_0.jpg 7\n")
    (ddir / "list_gallery.txt").write_text("0007/0007_001_05_0303noon_0002_0.jpg 7\n"
                                           "0008/0008_001_05_0303noon_0003_0.jpg 8\n")
    with pytest.warns(DatasetWarning, match="1 line"):
        data = build_dataset("msmt17", str(tmp_path))
    assert sorted((r.pid, r.camid) for r in data.train) == [(0, 0), (0, 2), (1, 14)]
    assert [(r.pid, r.camid) for r in data.query] == [(7, 1)]
    assert data.query[0].path.endswith("test/0007/0007_000_02_0303noon_0001_0.jpg")
    assert len(build_dataset("msmt17", str(tmp_path), combine_val=False).train) == 2


def test_custom_market_and_pid_folder_layouts(tmp_path, fake):
    fake.make_three_folders(tmp_path / "a", {"bounding_box_train": [(4, 1), (2, 2)], "query": [(8, 1)],
                                             "bounding_box_test": [(8, 9)]})
    data = build_dataset("custom", str(tmp_path / "a"))
    assert [r.pid for r in data.train] == [0, 1] and data.gallery[0].camid == 8
    for split, pids in {"train": [3, 4], "query": [10], "gallery": [10, 11]}.items():
        for pid in pids:
            fake.touch(tmp_path / "b" / split / str(pid) / "img1.png")
    data = build_dataset("custom", str(tmp_path / "b"), camids={"gallery": 5})
    assert {r.camid for r in data.gallery} == {5} and {r.camid for r in data.query} == {0}
    with pytest.raises(FileNotFoundError, match="pid"):
        build_dataset("custom", str(tmp_path / "missing"))


def test_the_camera_count_covers_every_split(tmp_path, fake):
    """num_cameras spans the camera ids of every split (a test-only camera is in range), train_cameras are the
    ones training sees: pid folders give train 0, query 0, gallery 1."""
    for split, pids in {"train": [3, 4], "query": [10], "gallery": [10, 11]}.items():
        for pid in pids:
            fake.touch(tmp_path / "b" / split / str(pid) / "img1.png")
    data = build_dataset("custom", str(tmp_path / "b"))
    assert (data.num_cameras, data.train_cameras, data.num_train_cams) == (2, {0}, 1)
    fake.make_three_folders(tmp_path / "a", {"bounding_box_train": [(4, 1), (2, 2)], "query": [(8, 1)],
                                             "bounding_box_test": [(8, 9)]})
    data = build_dataset("custom", str(tmp_path / "a"))
    assert (data.num_cameras, data.train_cameras) == (9, {0, 1})
