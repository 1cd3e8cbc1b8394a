"""GalleryIndex: each kind builds, searches, saves and loads; the approximate kinds find the exact neighbours;
bad input is refused with the problem named."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from amfor.extras import MissingExtraError
from amfor.search import KINDS, GalleryIndex, SearchError


def clustered(n: int, d: int, ids: int, noise: float = 0.6, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """n features [n, d] around `ids` random identity centres (not uniform noise), and their ids [n]."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(ids, d)).astype(np.float32)
    pids = rng.integers(0, ids, n)
    return torch.from_numpy(centres[pids] + noise * rng.normal(size=(n, d)).astype(np.float32)), pids


def exact_top(queries: torch.Tensor, gallery: torch.Tensor, k: int) -> torch.Tensor:
    """Brute-force top k by cosine similarity [Q, k] (rows)."""
    sim = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(gallery, dim=1).T
    return torch.topk(sim, k, dim=1).indices


def small_params(kind: str) -> dict:
    return {"ivf": {"nlist": 16, "nprobe": 4}, "hnsw": {"M": 16}}.get(kind, {})


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_round_trips_through_its_folder(tmp_path, kind):
    gallery, _ = clustered(600, 24, 40)
    queries, _ = clustered(30, 24, 40, seed=1)
    parts, vis = torch.randn(600, 3, 24), torch.rand(600, 3)
    camids = torch.arange(600) % 6
    paths = [f"g/{i}.jpg" for i in range(600)]
    index = GalleryIndex.build(gallery, paths, kind, parts=parts, visibility=vis, camids=camids,
                               metadata={"model": "m"}, **small_params(kind))
    scores, rows = index.search(queries, 10)
    assert scores.shape == rows.shape == (30, 10) and rows.dtype == torch.int64
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # similarities, closest first
    want = (torch.nn.functional.normalize(queries, dim=1)
            * torch.nn.functional.normalize(gallery, dim=1)[rows[:, 0]]).sum(1)
    torch.testing.assert_close(scores[:, 0], want, atol=1e-5, rtol=0)  # cosine similarity

    folder = index.save(tmp_path / "sub" / "gallery.index")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["gallery.index"]  # no temporary left
    loaded = GalleryIndex.load(folder)
    assert (loaded.kind, len(loaded), loaded.dim, loaded.paths, loaded.metadata) == (kind, 600, 24, paths,
                                                                                       {"model": "m"})
    assert loaded.params == index.params
    assert isinstance(loaded.parts, np.memmap)  # read on demand: re-scoring touches only its shortlist's rows
    np.testing.assert_array_equal(loaded.parts, parts.numpy())
    np.testing.assert_array_equal(loaded.visibility, vis.numpy())
    np.testing.assert_array_equal(loaded.camids, camids.numpy())
    again, again_rows = loaded.search(queries, 10)
    torch.testing.assert_close(again, scores)
    assert torch.equal(again_rows, rows)
    torch.testing.assert_close(loaded.features([3, 7]), torch.nn.functional.normalize(gallery[[3, 7]], dim=1))
    assert loaded.nbytes >= 600 * 24 * 4  # the vectors at least


def test_save_replaces_an_index_but_nothing_else(tmp_path):
    gallery, _ = clustered(50, 8, 5)
    GalleryIndex.build(gallery, kind="flat").save(tmp_path / "a.index")
    GalleryIndex.build(gallery[:20], kind="flat").save(tmp_path / "a.index")
    assert len(GalleryIndex.load(tmp_path / "a.index")) == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.index"]
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "x.jpg").write_bytes(b"x")
    with pytest.raises(SearchError, match="photos: exists and is not a saved index"):
        GalleryIndex.build(gallery, kind="flat").save(tmp_path / "photos")
    assert (tmp_path / "photos" / "x.jpg").is_file()


def test_flat_is_exact_for_short_and_whole_gallery_lists():
    gallery, _ = clustered(3000, 16, 100)
    queries, _ = clustered(40, 16, 100, seed=2)
    index = GalleryIndex.build(gallery, kind="flat")
    assert torch.equal(index.search(queries, 10)[1], exact_top(queries, gallery, 10))
    scores, rows = index.search(queries, 3000)  # the whole gallery: the sorted path
    assert torch.equal(torch.sort(rows, dim=1).values, torch.arange(3000).expand(40, -1))
    assert torch.equal(rows[:, :50], exact_top(queries, gallery, 50))
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_whole_gallery_lists_break_ties_by_gallery_row():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [2.0, 0.0], [0.0, 3.0]]).repeat(300, 1)
    index = GalleryIndex.build(gallery, kind="flat")
    _, rows = index.search(torch.tensor([[1.0, 0.0]]), len(gallery))
    want = torch.sort(torch.tensor([0 if i % 5 in (0, 2, 3) else 1 for i in range(1500)]), stable=True).indices
    assert torch.equal(rows[0], want)  # equal similarities in gallery order, as a stable sort gives


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_kinds_find_the_exact_neighbours(kind):
    gallery, _ = clustered(5000, 32, 250)
    queries, _ = clustered(200, 32, 250, seed=3)
    want = exact_top(queries, gallery, 10)
    index = GalleryIndex.build(gallery, kind=kind)
    _, rows = index.search(queries, 10, **{"ivf": {"nprobe": 32}, "hnsw": {}}[kind])  # hnsw: its default effort
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows.tolist(), want.tolist(), strict=True)])
    assert recall >= 0.9, recall
    # the search parameter trades speed for recall: one cell or a tiny beam finds less
    low = {"ivf": {"nprobe": 1}, "hnsw": {"ef_search": 10}}[kind]
    _, fewer = index.search(queries, 10, **low)
    low_recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(fewer.tolist(), want.tolist(), strict=True)])
    assert low_recall < recall


def test_ivf_defaults_follow_the_gallery_size(capfd):
    index = GalleryIndex.build(clustered(40000, 4, 50)[0], kind="ivf")
    assert index.params["nlist"] == 800 and index.params["train_size"] == 40000  # 4 sqrt(N), 64 a cell capped at N
    small = GalleryIndex.build(clustered(2500, 4, 50)[0], kind="ivf")
    assert small.params["nlist"] == 2500 // 39  # 39 training vectors a cell at least
    assert "WARNING" not in capfd.readouterr().err  # faiss's k-means had enough vectors


def test_bad_input_is_named(tmp_path):
    gallery, _ = clustered(100, 8, 5)
    index = GalleryIndex.build(gallery, kind="flat")
    with pytest.raises(SearchError, match="k = 101 must be between 1 and the gallery size 100"):
        index.search(gallery[:2], 101)
    with pytest.raises(SearchError, match="query features have dimension 9, the index has 8"):
        index.search(torch.randn(2, 9), 5)
    with pytest.raises(SearchError, match="kind must be one of flat, ivf, hnsw, got 'lsh'"):
        GalleryIndex.build(gallery, kind="lsh")
    with pytest.raises(SearchError, match="unknown parameter.*nprobe for a hnsw index"):
        GalleryIndex.build(gallery, kind="hnsw", nprobe=3)
    with pytest.raises(SearchError, match="unknown search parameter.*ef_search for a flat index"):
        index.search(gallery[:2], 5, ef_search=10)
    with pytest.raises(SearchError, match="no gallery features"):
        GalleryIndex.build(torch.zeros(0, 8))
    with pytest.raises(SearchError, match="3 paths for 100 gallery features"):
        GalleryIndex.build(gallery, ["a", "b", "c"])
    with pytest.raises(SearchError, match="gallery features contain NaN or inf"):
        GalleryIndex.build(gallery.index_fill(0, torch.tensor([4]), float("nan")))
    with pytest.raises(SearchError, match="parts and visibility go together"):
        GalleryIndex.build(gallery, parts=torch.zeros(100, 2, 8))
    with pytest.raises(SearchError, match="missing.index: no such index folder"):
        GalleryIndex.load(tmp_path / "missing.index")
    (tmp_path / "broken.index").mkdir()
    (tmp_path / "broken.index" / "index.json").write_text("{not json")
    with pytest.raises(SearchError, match="broken.index: not a readable gallery index"):
        GalleryIndex.load(tmp_path / "broken.index")
    with pytest.raises(SearchError, match="holds no part features"):
        index.part_features([0])


def test_a_missing_faiss_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "faiss" else real(name, *a))
    with pytest.raises(MissingExtraError, match=r'needs faiss \(not installed\): pip install "amfor\[search\]"'):
        GalleryIndex.build(torch.randn(10, 4))
