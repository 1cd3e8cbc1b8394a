"""k-reciprocal re-ranking against the classic loop implementation (conftest.oracle_rerank)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amfor.evaluation import evaluate_rank, global_distance, re_ranking, re_ranking_distmat
from amfor.evaluation.reranking import stable_topk_smallest


def symmetric_blocks(feats, nq):
    full = global_distance(feats, feats).double().numpy()
    full = ((full + full.T) / 2).astype(np.float32)
    np.fill_diagonal(full, 0)
    return full[:nq, nq:], full[:nq, :nq], full[nq:, nq:]


@pytest.mark.parametrize("nq,ng,k1,k2", [(12, 50, 20, 6), (30, 90, 8, 3), (5, 40, 6, 1)])
def test_matches_classic_algorithm(rerank_oracle, nq, ng, k1, k2):
    rng = np.random.default_rng(nq)
    centers = rng.normal(size=(10, 16))
    labels = rng.integers(0, 10, nq + ng)
    feats = torch.as_tensor(centers[labels] + 0.8 * rng.normal(size=(nq + ng, 16)), dtype=torch.float32)
    qg, qq, gg = symmetric_blocks(feats, nq)
    want = rerank_oracle(qg, qq, gg, k1, k2, 0.3)
    got = re_ranking_distmat(qg, qq, gg, k1, k2, 0.3, chunk_size=7)
    np.testing.assert_allclose(got, want, atol=1e-5)
    ids = (labels[:nq], labels[nq:], np.zeros(nq, int), np.ones(ng, int))
    assert evaluate_rank(got, *ids)["mAP"] == evaluate_rank(want, *ids)["mAP"]


def test_feature_entry_point_matches_distmat_entry_point():
    feats = torch.randn(60, 8)
    qg, qq, gg = symmetric_blocks(feats, 15)
    a = re_ranking(feats[:15], feats[15:], k1=10, k2=3, chunk_size=16)
    b = re_ranking_distmat(qg, qq, gg, k1=10, k2=3)
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert a.shape == (15, 45) and a.dtype == np.float32


def test_stable_topk_breaks_ties_by_index():
    x = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0, 1.0]])
    assert stable_topk_smallest(x, 3).tolist() == [[4, 1, 2]]


def test_bad_blocks_raise():
    with pytest.raises(ValueError, match="q_q_dist"):
        re_ranking_distmat(np.zeros((2, 3)), np.zeros((3, 3)), np.zeros((3, 3)))
