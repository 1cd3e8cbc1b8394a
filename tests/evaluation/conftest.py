"""Independent oracles for the evaluation tests: the straightforward per-query and classic algorithms."""

from __future__ import annotations

import numpy as np
import pytest


def oracle_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """Per query: stable sort, drop same pid + same cam, AP = mean precision@i over the true matches."""
    aps, inps, firsts = [], [], []
    for i in range(len(q_pids)):
        order = sorted(range(len(g_pids)), key=lambda j: (distmat[i][j], j))
        kept = [j for j in order if not (g_pids[j] == q_pids[i] and g_camids[j] == q_camids[i])]
        hits = [r + 1 for r, j in enumerate(kept) if g_pids[j] == q_pids[i]]
        if not hits:
            continue
        aps.append(sum((n + 1) / r for n, r in enumerate(hits)) / len(hits))
        inps.append(len(hits) / hits[-1])
        firsts.append(hits[0])
    if not aps:
        raise ValueError("no valid query")
    cmc = np.array([np.mean([f <= k for f in firsts]) for k in range(1, max_rank + 1)])
    return {"mAP": float(np.mean(aps)), "mINP": float(np.mean(inps)), "cmc": cmc, "num_valid_queries": len(aps)}


def oracle_rerank(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3):
    """The classic k-reciprocal re-ranking (Zhong et al. 2017), written out loop by loop, float32."""
    original = np.concatenate([np.concatenate([q_q_dist, q_g_dist], 1),
                               np.concatenate([q_g_dist.T, g_g_dist], 1)], 0).astype(np.float32)
    num_q, num_all = q_g_dist.shape[0], original.shape[0]
    original = np.transpose(original / np.max(original, axis=0))
    v = np.zeros_like(original, dtype=np.float32)
    initial_rank = np.argsort(original, axis=1, kind="stable")

    def reciprocal(i, k):
        forward = initial_rank[i, :k + 1]
        backward = initial_rank[forward, :k + 1]
        return forward[np.where(backward == i)[0]]

    for i in range(num_all):
        k_rec = reciprocal(i, k1)
        expansion = k_rec
        for cand in k_rec:
            cand_rec = reciprocal(cand, int(np.around(k1 / 2.0)))
            if len(np.intersect1d(cand_rec, k_rec)) > 2.0 / 3 * len(cand_rec):
                expansion = np.append(expansion, cand_rec)
        expansion = np.unique(expansion)
        weight = np.exp(-original[i, expansion])
        v[i, expansion] = weight / np.sum(weight)
    original = original[:num_q]
    if k2 != 1:
        v = np.stack([np.mean(v[initial_rank[i, :k2]], axis=0) for i in range(num_all)]).astype(np.float32)
    inv_index = [np.where(v[:, i] != 0)[0] for i in range(num_all)]
    jaccard = np.zeros_like(original, dtype=np.float32)
    for i in range(num_q):
        temp_min = np.zeros((1, num_all), dtype=np.float32)
        nonzero = np.where(v[i] != 0)[0]
        for k in nonzero:
            temp_min[0, inv_index[k]] += np.minimum(v[i, k], v[inv_index[k], k])
        jaccard[i] = 1 - temp_min / (2.0 - temp_min)
    final = jaccard * (1 - lambda_value) + original * lambda_value
    return final[:num_q, num_q:]


@pytest.fixture
def rank_oracle():
    return oracle_rank


@pytest.fixture
def rerank_oracle():
    return oracle_rerank
