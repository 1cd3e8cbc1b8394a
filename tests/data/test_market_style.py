"""Market-1501, DukeMTMC-reID and Occluded-Duke parsers on faithfully laid-out fake copies."""

from __future__ import annotations

import time

import numpy as np
import pytest

from amfor.data import DatasetWarning, build_dataset, list_datasets


def small_market(fake, ddir):
    splits = {
        "bounding_box_train": [(7, 1), (7, 2), (3, 1), (3, 6), (3, 6), (12, 4)],
        "query": [(3, 1), (12, 2), (40, 5)],
        "bounding_box_test": [(3, 2), (3, 1), (12, 3), (40, 6), (0, 1), (0, 2), (-1, 3), (-1, 1), (55, 4)],
    }
    fake.make_three_folders(ddir, splits)
    return splits


def test_registry_lists_every_dataset():
    assert set(list_datasets()) >= {"market1501", "dukemtmc", "occluded_duke", "occluded_reid", "p_dukemtmc",
                                    "partial_reid", "msmt17", "custom", "synthetic"}
    with pytest.raises(KeyError, match="unknown dataset"):
        build_dataset("nope", "/tmp")


def test_market_small_copy_parsed_exactly(tmp_path, fake):
    splits = small_market(fake, tmp_path / "Market-1501-v15.09.15")
    (tmp_path / "Market-1501-v15.09.15" / "query" / "Thumbs.db").touch()  # not an image: ignored silently
    data = build_dataset("market1501", str(tmp_path))
    # train pids relabelled in sorted raw order: 3 -> 0, 7 -> 1, 12 -> 2
    assert [r.pid for r in data.train] == [0, 0, 0, 1, 1, 2]
    assert data.num_train_pids == 3 and data.num_train_cams == 4
    assert sorted(r.camid for r in data.train) == sorted(c - 1 for _, c in splits["bounding_box_train"])
    assert sorted(r.pid for r in data.query) == [3, 12, 40]  # raw pids kept
    gallery_pids = sorted(r.pid for r in data.gallery)
    assert gallery_pids == [0, 0, 3, 3, 12, 40, 55]  # -1 junk dropped, 0 distractors kept
    assert all(0 <= r.camid <= 5 for r in data.splits()["gallery"])
    assert all(r.mask_path is None for r in data.train)
    assert "query" in data.summary() and "# ids" in data.summary()


def test_market_alternative_folder_name_and_root_itself(tmp_path, fake):
    small_market(fake, tmp_path / "market1501")
    assert len(build_dataset("market1501", str(tmp_path)).gallery) == 7
    assert len(build_dataset("market1501", str(tmp_path / "market1501")).gallery) == 7


def test_missing_folder_names_expected_layout(tmp_path):
    (tmp_path / "market1501" / "query").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="bounding_box_train"):
        build_dataset("market1501", str(tmp_path))


def test_unparseable_names_are_counted_and_reported(tmp_path, fake):
    ddir = tmp_path / "market1501"
    small_market(fake, ddir)
    fake.touch(ddir / "bounding_box_test" / "garbage.jpg")
    fake.touch(ddir / "bounding_box_test" / "0005_c9s1_000001_01.jpg")  # camera 9 does not exist in Market
    with pytest.warns(DatasetWarning, match="2 file name"):
        data = build_dataset("market1501", str(tmp_path))
    assert len(data.gallery) == 7


def test_empty_split_is_an_error(tmp_path, fake):
    ddir = tmp_path / "market1501"
    fake.make_three_folders(ddir, {"bounding_box_train": [(1, 1)], "query": [], "bounding_box_test": [(1, 2)]})
    with pytest.raises(ValueError, match="'query' is empty"):
        build_dataset("market1501", str(tmp_path))


def _official_market(fake, ddir, rng):
    """A full-size fake Market-1501 whose counts come out as the official ones (ids/images per split)."""

    def spread(pids, n_images):
        counts = np.ones(len(pids), int) + np.bincount(rng.integers(0, len(pids), n_images - len(pids)),
                                                       minlength=len(pids))
        return [(int(p), int(rng.integers(1, 7))) for p, c in zip(pids, counts, strict=True) for _ in range(c)]

    ids = rng.permutation(np.arange(1, 1502))  # 1,501 ids: 751 train, 750 test
    train_ids, test_ids = np.sort(ids[:751]), np.sort(ids[751:])
    gallery = spread(test_ids, 15913 - 2798) + [(0, int(c)) for c in rng.integers(1, 7, 2798)]
    gallery += [(-1, int(c)) for c in rng.integers(1, 7, 3819)]
    fake.make_three_folders(ddir, {"bounding_box_train": spread(train_ids, 12936),
                                   "query": spread(test_ids, 3368), "bounding_box_test": gallery})


def test_market_full_size_fake_gives_official_counts(tmp_path, fake):
    t0 = time.perf_counter()
    _official_market(fake, tmp_path / "Market-1501-v15.09.15", np.random.default_rng(0))
    data = build_dataset("market1501", str(tmp_path))
    assert (len(data.train), data.num_train_pids, data.num_train_cams) == (12936, 751, 6)
    assert (len(data.query), data.num_query_pids) == (3368, 750)
    assert (len(data.gallery), data.num_gallery_pids) == (15913, 751)  # 750 test ids + distractor pid 0
    assert time.perf_counter() - t0 < 30


def test_counts_are_derived_from_files_not_hard_coded(tmp_path, fake):
    ddir = tmp_path / "market1501"
    small_market(fake, ddir)
    before = build_dataset("market1501", str(tmp_path))
    fake.touch(ddir / "bounding_box_train" / fake.market_name(99, 3, 123456))
    after = build_dataset("market1501", str(tmp_path))
    assert len(after.train) == len(before.train) + 1 and after.num_train_pids == before.num_train_pids + 1
    assert after.train[-1].pid == 3  # 99 sorts last among {3, 7, 12, 99}


@pytest.mark.parametrize("name,folder", [("dukemtmc", "DukeMTMC-reID"), ("occluded_duke", "Occluded_Duke")])
def test_duke_family(tmp_path, fake, name, folder):
    splits = {"bounding_box_train": [(1, 8), (1, 2), (5, 3)], "query": [(9, 1), (10, 8)],
              "bounding_box_test": [(9, 2), (10, 7), (11, 1), (0, 4), (-1, 5)]}
    fake.make_three_folders(tmp_path / folder, splits, name_fn=fake.duke_name)
    data = build_dataset(name, str(tmp_path))
    assert sorted((r.pid, r.camid) for r in data.train) == [(0, 1), (0, 7), (1, 2)]
    assert sorted(r.pid for r in data.gallery) == [0, 9, 10, 11]
    assert {r.camid for r in data.query} == {0, 7}


def test_masks_from_parallel_tree(tmp_path, fake):
    ddir = tmp_path / "market1501"
    small_market(fake, ddir)
    first = sorted((ddir / "bounding_box_train").iterdir())[0]
    fake.touch(ddir / "masks" / "bounding_box_train" / first.with_suffix(".png").name)
    with pytest.warns(DatasetWarning, match="no parsing mask"):
        data = build_dataset("market1501", str(tmp_path))
    with_mask = [r for r in data.train if r.mask_path is not None]
    assert len(with_mask) == 1 and with_mask[0].path == str(first.resolve())


def test_bad_image_error_or_skip(tmp_path, fake):
    ddir = tmp_path / "market1501"
    fake.make_three_folders(ddir, {"bounding_box_train": [(1, 1), (2, 1)], "query": [(3, 1)],
                                   "bounding_box_test": [(3, 2), (4, 2)]}, real=True)
    bad = fake.touch(ddir / "bounding_box_train" / fake.market_name(2, 2, 999))
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(OSError, match=bad.name):
        build_dataset("market1501", str(tmp_path), verify_images=True)
    with pytest.warns(DatasetWarning, match="unreadable"):
        data = build_dataset("market1501", str(tmp_path), verify_images=True, on_bad_image="skip")
    assert len(data.train) == 2
