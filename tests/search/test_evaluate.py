"""The Market-1501 protocol on an index's ranked lists: the same metrics as evaluation when the index is exact and
the lists are whole; lists cut at k count the matches they miss as not found."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amfor.evaluation import evaluate_features, evaluate_rank
from amfor.search import GalleryIndex, SearchError, evaluate_index, evaluate_ranked, ranked_list_metrics

NUM_QUERY, NUM_GALLERY, NUM_IDS, NUM_CAMS, DIM = 3368, 15913, 751, 6, 64


def market_like(seed: int = 0, nq: int = NUM_QUERY, ng: int = NUM_GALLERY, ids: int = NUM_IDS, d: int = DIM):
    """Features of Market-1501's size and structure: identity centres plus noise, distractors (pid 0) in the
    gallery, 6 cameras, so that same-id same-camera entries (junk) occur."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(ids + 1, d)).astype(np.float32)
    g_pids = rng.integers(0, ids + 1, ng)
    q_pids = rng.integers(1, ids + 1, nq)
    g_cams, q_cams = rng.integers(0, NUM_CAMS, ng), rng.integers(0, NUM_CAMS, nq)
    gf = torch.from_numpy(centres[g_pids] + 1.2 * rng.normal(size=(ng, d)).astype(np.float32))
    qf = torch.from_numpy(centres[q_pids] + 1.2 * rng.normal(size=(nq, d)).astype(np.float32))
    return qf, gf, (q_pids, g_pids, q_cams, g_cams)


def test_an_exact_index_with_whole_lists_gives_the_evaluations_metrics():
    qf, gf, ids = market_like()
    index = GalleryIndex.build(gf, kind="flat", camids=torch.from_numpy(ids[3]))
    got = evaluate_index(index, qf, ids[0], ids[1], ids[2])  # k = the gallery; g_camids from the index
    want = evaluate_features(qf, gf, *ids)
    assert 0.3 < want["mAP"] < 0.95  # matches spread down the lists: the comparison means something
    assert got["num_valid_queries"] == want["num_valid_queries"]
    assert got["mAP"] == pytest.approx(want["mAP"], abs=1e-6)
    assert got["mINP"] == pytest.approx(want["mINP"], abs=1e-6)
    np.testing.assert_allclose(got["cmc"], want["cmc"], atol=1e-6, rtol=0)


def test_ranked_lists_match_evaluate_rank_with_junk_and_ties():
    gen = torch.Generator().manual_seed(1)
    dist = torch.randint(0, 6, (40, 120), generator=gen).float()  # many ties: the order is by gallery index
    q_pids, g_pids = torch.randint(0, 8, (40,), generator=gen), torch.randint(0, 8, (120,), generator=gen)
    q_cams, g_cams = torch.randint(0, 3, (40,), generator=gen), torch.randint(0, 3, (120,), generator=gen)
    lists = torch.sort(dist, dim=1, stable=True).indices
    got = evaluate_ranked(lists, q_pids, g_pids, q_cams, g_cams, max_rank=20, return_per_query=True)
    want = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=20, return_per_query=True)
    for key in ("mAP", "mINP", "num_valid_queries"):
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    np.testing.assert_allclose(got["cmc"], want["cmc"], atol=1e-12)
    np.testing.assert_allclose(got["AP"], want["AP"], atol=1e-12)


def test_lists_cut_at_k_count_missed_matches_as_not_found():
    # one query (pid 1, camera 0); gallery: 0 match, 1 junk (same camera), 2 other, 3 match, 4 other, 5 match
    g_pids, g_cams = [1, 1, 2, 1, 3, 1], [1, 0, 1, 2, 1, 1]
    full = torch.tensor([[0, 1, 2, 3, 4, 5]])
    ap, first, inp, valid = ranked_list_metrics(full, [1], g_pids, [0], g_cams)
    # kept ranks 1..5 (junk removed): matches at 1, 3, 5 -> AP = (1/1 + 2/3 + 3/5) / 3, INP = 3 / 5
    assert ap.item() == pytest.approx((1 + 2 / 3 + 3 / 5) / 3) and inp.item() == pytest.approx(3 / 5)
    assert first.item() == 1 and valid.item()
    cut = torch.tensor([[0, 1, 2, 3]])  # the match at row 5 is not reached
    ap, first, inp, _ = ranked_list_metrics(cut, [1], g_pids, [0], g_cams)
    assert ap.item() == pytest.approx((1 + 2 / 3) / 3) and inp.item() == 0.0 and first.item() == 1
    late = torch.tensor([[2, 4, -1, -1]])  # an approximate index's list: no match found, -1 for nothing
    ap, first, inp, valid = ranked_list_metrics(late, [1], g_pids, [0], g_cams)
    assert ap.item() == 0.0 and inp.item() == 0.0 and first.item() == 7 and valid.item()


def test_an_approximate_index_comes_close_to_exact():
    qf, gf, ids = market_like(nq=300, ng=4000, ids=200)
    exact = evaluate_features(qf, gf, *ids)
    got = evaluate_index(GalleryIndex.build(gf, kind="hnsw"), qf, *ids, k=100)
    assert got["num_valid_queries"] == exact["num_valid_queries"]
    assert got["cmc"][0] == pytest.approx(exact["cmc"][0], abs=0.02)
    assert got["mAP"] == pytest.approx(exact["mAP"], abs=0.05)  # lists cut at 100, a few neighbours missed


def test_bad_labels_and_lists_are_named():
    index = GalleryIndex.build(torch.randn(10, 4), kind="flat")
    with pytest.raises(SearchError, match="g_camids not given and the index holds no camids"):
        evaluate_index(index, torch.randn(2, 4), [0, 1], list(range(10)), [0, 0])
    with pytest.raises(SearchError, match="g_pids must be a vector of length 10"):
        evaluate_index(index, torch.randn(2, 4), [0, 1], list(range(9)), [0, 0], [0] * 10)
    with pytest.raises(SearchError, match="ranked lists index row 12 of a gallery of 10"):
        ranked_list_metrics(torch.tensor([[12]]), [0], list(range(10)), [0], [0] * 10)
    with pytest.raises(SearchError, match="rows are >= 0, or -1"):
        ranked_list_metrics(torch.tensor([[-3]]), [0], list(range(10)), [0], [0] * 10)
