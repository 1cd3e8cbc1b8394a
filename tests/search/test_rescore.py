"""Re-scoring a shortlist gives the part distance computed directly; re-ranking a shortlist is k-reciprocal
re-ranking over the queries and the union of the shortlists."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amfor.evaluation import pairwise_distance, re_ranking
from amfor.search import GalleryIndex, SearchError, rerank_shortlist, rescore_parts


@pytest.fixture(scope="module")
def gallery():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(30, 4, 16, generator=gen)
    pids = torch.randint(0, 30, (400,), generator=gen)
    parts = centres[pids] + 0.5 * torch.randn(400, 4, 16, generator=gen)
    vis = torch.rand(400, 4, generator=gen).index_fill(1, torch.tensor([0]), 1.0)  # the global part: visible
    vis[:20, 1:] = 0.0  # some images with every body part hidden: the plain-mean fallback
    index = GalleryIndex.build(parts[:, 0], [f"{i}.jpg" for i in range(400)], "flat", parts=parts, visibility=vis)
    q_parts = centres[:12] + 0.5 * torch.randn(12, 4, 16, generator=gen)
    q_vis = torch.rand(12, 4, generator=gen)
    return index, parts, vis, q_parts, q_vis


def test_rescoring_is_the_part_distance_to_each_shortlisted_image(gallery):
    index, parts, vis, q_parts, q_vis = gallery
    _, shortlist = index.search(q_parts[:, 0], 50)
    dist, rows = rescore_parts(q_parts, shortlist, index, q_vis)
    full = pairwise_distance(q_parts, parts, q_vis=q_vis, g_vis=vis)  # [Q, G], computed directly
    torch.testing.assert_close(dist, full.gather(1, rows), atol=1e-6, rtol=0)
    assert (dist[:, :-1] <= dist[:, 1:]).all()  # ascending
    assert torch.equal(torch.sort(rows, 1).values, torch.sort(shortlist, 1).values)  # the same images, re-ordered
    # a (parts, visibility) pair instead of the index: the same
    again, again_rows = rescore_parts(q_parts, shortlist, (parts.numpy(), vis.numpy()), q_vis)
    assert torch.equal(again_rows, rows) and torch.equal(again, dist)


def test_rescoring_puts_what_was_not_found_last(gallery):
    index, parts, vis, q_parts, q_vis = gallery
    shortlist = torch.tensor([[5, -1, 7, 2]]).expand(12, -1)
    dist, rows = rescore_parts(q_parts, shortlist, index, q_vis)
    assert (rows[:, -1] == -1).all() and torch.isinf(dist[:, -1]).all() and torch.isfinite(dist[:, :-1]).all()


def test_reranking_is_k_reciprocal_over_the_union_of_shortlists(gallery):
    index, parts, vis, q_parts, q_vis = gallery
    queries = q_parts[:, 0]
    _, shortlist = index.search(queries, 40)
    dist, rows = rerank_shortlist(queries, shortlist, index, k1=8, k2=3)
    union = torch.unique(shortlist)
    want = torch.from_numpy(re_ranking(torch.nn.functional.normalize(queries, dim=1),
                                       torch.nn.functional.normalize(parts[union, 0], dim=1), k1=8, k2=3))
    position = torch.searchsorted(union, rows)
    torch.testing.assert_close(dist, want.gather(1, position), atol=1e-6, rtol=0)
    assert (dist[:, :-1] <= dist[:, 1:]).all()
    # on the part distance, with the visibility
    pdist, prows = rerank_shortlist(queries, shortlist, index, k1=8, k2=3, q_parts=q_parts, q_vis=q_vis)
    pwant = torch.from_numpy(re_ranking(q_parts, parts[union], k1=8, k2=3, q_vis=q_vis, g_vis=vis[union]))
    torch.testing.assert_close(pdist, pwant.gather(1, torch.searchsorted(union, prows)), atol=1e-6, rtol=0)


def test_reranking_a_single_short_list_shrinks_k1_and_k2(gallery):
    index, _, _, q_parts, _ = gallery
    _, shortlist = index.search(q_parts[:1, 0], 3)
    dist, rows = rerank_shortlist(q_parts[:1, 0], shortlist, index)  # k1 = 20, k2 = 6 > the 4 images
    assert rows.shape == (1, 3) and torch.isfinite(dist).all()


def test_bad_shortlists_and_parts_are_named(gallery):
    index, parts, vis, q_parts, q_vis = gallery
    with pytest.raises(SearchError, match=r"shortlist must be \[Q, k\] with Q = 12"):
        rescore_parts(q_parts, torch.zeros(3, 5, dtype=torch.long), index, q_vis)
    with pytest.raises(SearchError, match=r"query parts are \[4, 8\] per image, the gallery's \[4, 16\]"):
        rescore_parts(torch.randn(12, 4, 8), torch.zeros(12, 5, dtype=torch.long), index)
    with pytest.raises(SearchError, match=r"queries must be \[Q, 16\]"):
        rerank_shortlist(torch.randn(12, 8), torch.zeros(12, 5, dtype=torch.long), index)
    plain = GalleryIndex.build(np.asarray(parts[:, 0]), kind="flat")
    with pytest.raises(SearchError, match="holds no part features"):
        rescore_parts(q_parts, torch.zeros(12, 5, dtype=torch.long), plain)
