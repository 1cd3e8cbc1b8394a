"""Evaluation throughput at Market-1501 size (3,368 x 15,913) on CPU (or the GPU when there is one).

- evaluate_rank (vectorised, chunked) vs the classic per-query loop. The classic loop is timed on a
  subset of queries and extrapolated linearly to all 3,368 (it is exactly linear in the query count);
  the printed line says so. Numbers are asserted identical on that subset, and on the full set for mAP.
- evaluate_features (distances + metrics in chunks).
- k-reciprocal re-ranking on the full 19,281 images, with the process's peak RSS.
Run: pytest benchmarks/test_evaluation.py -s
"""

from __future__ import annotations

import resource
import time

import numpy as np
import pytest
import torch

from amfor.evaluation import evaluate_features, evaluate_rank, evaluate_rank_classic, global_distance, re_ranking
from benchmarks.common import stats_median_ms

NUM_QUERY, NUM_GALLERY, NUM_IDS, NUM_CAMS, DIM = 3368, 15913, 751, 6, 256
CLASSIC_SUBSET = 400
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def market():
    """Random features with Market-like structure: 750 test ids + distractors (pid 0), 6 cameras."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(NUM_IDS + 1, DIM)).astype(np.float32)
    g_pids = np.concatenate([rng.integers(1, NUM_IDS + 1, NUM_GALLERY - 2798), np.zeros(2798, np.int64)])
    q_pids = rng.choice(np.unique(g_pids[g_pids > 0]), NUM_QUERY)
    g_cams, q_cams = rng.integers(0, NUM_CAMS, NUM_GALLERY), rng.integers(0, NUM_CAMS, NUM_QUERY)
    noise = 1.8  # mAP ~0.71, R1 ~0.97: the scale of a real Market-1501 model, so matches spread down the list
    gf = torch.from_numpy(centers[g_pids] + noise * rng.normal(size=(NUM_GALLERY, DIM)).astype(np.float32))
    gf[g_pids == 0] = torch.from_numpy(rng.normal(size=(2798, DIM)).astype(np.float32))
    qf = torch.from_numpy(centers[q_pids] + noise * rng.normal(size=(NUM_QUERY, DIM)).astype(np.float32))
    return dict(qf=qf, gf=gf, ids=(q_pids, g_pids, q_cams, g_cams))


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def test_evaluate_rank_market_vs_classic(benchmark, market):
    dist = global_distance(market["qf"].to(DEVICE), market["gf"].to(DEVICE))
    _sync()

    def run():
        out = evaluate_rank(dist, *market["ids"])
        _sync()
        return out

    ours = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    ours_s = stats_median_ms(benchmark, run, rounds=1) / 1e3
    q_pids, g_pids, q_cams, g_cams = market["ids"]
    sub = slice(0, CLASSIC_SUBSET)
    dist_np = dist.cpu().numpy()
    t0 = time.perf_counter()
    classic = evaluate_rank_classic(dist_np[sub], q_pids[sub], g_pids, q_cams[sub], g_cams)
    classic_s = (time.perf_counter() - t0) * NUM_QUERY / CLASSIC_SUBSET
    mine_sub = evaluate_rank(dist[sub], q_pids[sub], g_pids, q_cams[sub], g_cams)
    assert mine_sub["mAP"] == pytest.approx(classic["mAP"], abs=1e-12)
    assert mine_sub["mINP"] == pytest.approx(classic["mINP"], abs=1e-12)
    np.testing.assert_array_equal(mine_sub["cmc"], classic["cmc"])
    print(f"\n[{DEVICE}] evaluate_rank {NUM_QUERY}x{NUM_GALLERY}: {ours_s:.2f} s (median of 3); classic loop: "
          f"{classic_s:.1f} s extrapolated from {CLASSIC_SUBSET} queries -> speed-up {classic_s / ours_s:.1f}x; "
          f"mAP {ours['mAP']:.4f} R1 {ours['cmc'][0]:.4f} mINP {ours['mINP']:.4f}")


def test_evaluate_features_market(benchmark, market):
    qf, gf = market["qf"].to(DEVICE), market["gf"].to(DEVICE)

    def run():
        out = evaluate_features(qf, gf, *market["ids"])
        _sync()
        return out

    res = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    want = evaluate_rank(global_distance(qf, gf), *market["ids"])
    assert res["mAP"] == pytest.approx(want["mAP"], abs=1e-12)
    seconds = stats_median_ms(benchmark, run, 1) / 1e3
    print(f"\n[{DEVICE}] evaluate_features (distances + metrics, D={DIM}): {seconds:.2f} s")


def test_reranking_market_memory(benchmark, market):
    def run():
        return re_ranking(market["qf"], market["gf"], k1=20, k2=6, lambda_value=0.3)

    out = benchmark.pedantic(run, rounds=1, iterations=1)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    res = evaluate_rank(out, *market["ids"])
    base = evaluate_rank(global_distance(market["qf"], market["gf"]), *market["ids"])
    assert out.shape == (NUM_QUERY, NUM_GALLERY) and np.isfinite(out).all()
    assert peak_gib < 24
    seconds = stats_median_ms(benchmark, run, 1) / 1e3
    print(f"\nre-ranking {NUM_QUERY + NUM_GALLERY} images: {seconds:.1f} s, process peak RSS "
          f"{peak_gib:.2f} GiB; mAP {base['mAP']:.4f} -> {res['mAP']:.4f}")
