"""Distances: global metrics, the AMFOR part distance (against a per-pair loop), flip averaging."""

from __future__ import annotations

import math

import pytest
import torch

from amfor.evaluation import flip_average, global_distance, part_distance


def test_squared_euclidean_on_normalised_features_ranks_like_cosine():
    q, g = torch.randn(5, 12, dtype=torch.float64), torch.randn(40, 12, dtype=torch.float64)
    e, c = global_distance(q, g, "euclidean"), global_distance(q, g, "cosine")
    torch.testing.assert_close(e, 2 * c, atol=1e-12, rtol=0)
    assert torch.equal(e.argsort(dim=1), c.argsort(dim=1))
    with pytest.raises(ValueError, match="metric"):
        global_distance(q, g, "manhattan")


def test_part_distance_matches_per_pair_formula():
    q, g = torch.randn(4, 3, 6), torch.randn(7, 3, 6)
    qv, gv = torch.rand(4, 3), torch.rand(7, 3)
    qv[0] = 0  # query 0 sees no part: falls back to the plain mean
    got = part_distance(q, g, qv, gv)
    qn, gn = torch.nn.functional.normalize(q, dim=2), torch.nn.functional.normalize(g, dim=2)
    for i in range(4):
        for j in range(7):
            d = [float((qn[i, p] - gn[j, p]).norm()) for p in range(3)]
            w = [math.sqrt(float(qv[i, p] * gv[j, p])) for p in range(3)]
            want = sum(a * b for a, b in zip(w, d, strict=True)) / sum(w) if sum(w) > 0 else sum(d) / 3
            assert float(got[i, j]) == pytest.approx(want, abs=1e-5)


def test_part_distance_validates_visibility():
    with pytest.raises(ValueError, match="q_vis"):
        part_distance(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.full((2, 3), 2.0), None)


def test_flip_average_swaps_part_pairs():
    f = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)
    flipped = f.clone()
    out = flip_average(f, flipped, part_pairs=[(1, 2)])
    torch.testing.assert_close(out[:, 1], (f[:, 1] + f[:, 2]) / 2)
    torch.testing.assert_close(out[:, 0], f[:, 0])
