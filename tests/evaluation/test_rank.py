"""evaluate_rank / evaluate_features against the per-query oracle (conftest.oracle_rank)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amfor.evaluation import evaluate_features, evaluate_rank, evaluate_rank_classic
from amfor.ops import available_backends, use_backend


@pytest.fixture(params=["cpp", "torch"], autouse=True)
def rank_backend(request):
    """Every test runs the C++ CPU kernel (torch.ops.amfor.rank_metrics) and the vectorised PyTorch version."""
    if request.param not in available_backends("cpu"):
        pytest.skip(f"{request.param} is not available here")
    with use_backend(request.param):
        yield request.param


def random_problem(rng, nq, ng, npid=6, ncam=3, ties=False):
    d = rng.integers(0, 4, (nq, ng)).astype(np.float64) if ties else rng.random((nq, ng))
    return d, rng.integers(0, npid, nq), rng.integers(0, npid, ng), rng.integers(0, ncam, nq), rng.integers(0, ncam, ng)


def assert_same(a, b):
    assert a["num_valid_queries"] == b["num_valid_queries"]
    assert a["mAP"] == pytest.approx(b["mAP"], abs=1e-12) and a["mINP"] == pytest.approx(b["mINP"], abs=1e-12)
    np.testing.assert_allclose(a["cmc"], b["cmc"], atol=1e-12)


@pytest.mark.parametrize("ties", [False, True])
def test_matches_oracle_on_random_problems(rank_oracle, ties):
    rng = np.random.default_rng(1 + ties)
    for _ in range(25):
        prob = random_problem(rng, int(rng.integers(1, 25)), int(rng.integers(1, 60)), ties=ties)
        try:
            want = rank_oracle(*prob, max_rank=8)
        except ValueError:
            with pytest.raises(ValueError, match="no valid query"):
                evaluate_rank(*prob, max_rank=8)
            continue
        assert_same(evaluate_rank(*prob, max_rank=8, chunk_size=int(rng.integers(1, 9))), want)
        assert_same(evaluate_rank_classic(*prob, max_rank=8), want)


def test_hand_case():
    # gallery: same pid same cam (junk), distractor 0, match, other, match
    d = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]])
    res = evaluate_rank(d, [1], [1, 0, 1, 2, 1], [0], [0, 1, 1, 1, 2], max_rank=4)
    # filtered list: 0, 1(match, rank 2), 2, 1(match, rank 4) -> AP = (1/2 + 2/4) / 2
    assert res["mAP"] == pytest.approx(0.5) and res["mINP"] == pytest.approx(0.5)
    np.testing.assert_array_equal(res["cmc"], [0, 1, 1, 1])


def test_queries_without_matches_are_skipped(rank_oracle):
    d = np.random.default_rng(0).random((3, 4))
    args = (d, [1, 2, 9], [1, 2, 2, 5], [0, 0, 0], [1, 0, 1, 1])
    res = evaluate_rank(*args, max_rank=4, return_per_query=True)
    assert res["num_valid_queries"] == 2 and list(res["valid"]) == [True, True, False] and np.isnan(res["AP"][2])
    assert_same(res, rank_oracle(*args, max_rank=4))


def test_torch_and_numpy_inputs_agree():
    prob = random_problem(np.random.default_rng(3), 20, 50)
    want = evaluate_rank(*prob, max_rank=10)
    got = evaluate_rank(*(torch.as_tensor(x) for x in prob), max_rank=10)
    assert_same(got, want)
    got32 = evaluate_rank(torch.as_tensor(prob[0], dtype=torch.float32), *prob[1:], max_rank=10)
    assert got32["num_valid_queries"] == want["num_valid_queries"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_inputs_match_cpu():
    prob = random_problem(np.random.default_rng(4), 40, 90)
    assert_same(evaluate_rank(torch.as_tensor(prob[0]).cuda(), *prob[1:]), evaluate_rank(*prob))


def test_infinite_distances_rank_last(rank_oracle):
    d, *ids = random_problem(np.random.default_rng(5), 10, 30, ties=True)
    d[:, ::4] = np.inf
    assert_same(evaluate_rank(d, *ids, max_rank=5), rank_oracle(d, *ids, max_rank=5))


@pytest.mark.parametrize("bad,match", [
    (dict(q_pids=[1, 2]), "q_pids"), (dict(g_camids=[0]), "g_camids"), (dict(distmat=np.zeros(3)), "distmat"),
    (dict(distmat=np.full((3, 4), np.nan)), "NaN"),
])
def test_bad_inputs_name_the_argument(bad, match):
    args = dict(distmat=np.zeros((3, 4)), q_pids=[1, 2, 3], g_pids=[1, 2, 3, 4], q_camids=[0, 0, 0],
                g_camids=[1, 1, 1, 1])
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        evaluate_rank(**args)


def test_no_valid_query_raises():
    with pytest.raises(ValueError, match="no valid query"):
        evaluate_rank(np.zeros((2, 2)), [1, 2], [1, 2], [0, 0], [0, 0])


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_evaluate_features_chunked_equals_full_matrix(metric):
    rng = np.random.default_rng(6)
    qf, gf = torch.randn(37, 16, dtype=torch.float64), torch.randn(120, 16, dtype=torch.float64)
    ids = (rng.integers(0, 10, 37), rng.integers(0, 10, 120), rng.integers(0, 3, 37), rng.integers(0, 3, 120))
    qn, gn = torch.nn.functional.normalize(qf, dim=1), torch.nn.functional.normalize(gf, dim=1)
    full = torch.cdist(qn, gn) ** 2 if metric == "euclidean" else 1 - qn @ gn.T
    want = evaluate_rank(full, *ids)
    for chunk in (1, 5, 37, None):
        assert_same(evaluate_features(qf, gf, *ids, metric=metric, chunk_size=chunk), want)


def test_evaluate_features_part_features_and_bad_shapes():
    rng = np.random.default_rng(7)
    qf, gf = torch.randn(10, 4, 8), torch.randn(30, 4, 8)
    qv, gv = torch.rand(10, 4).round(), torch.rand(30, 4).round()
    ids = (rng.integers(0, 5, 10), rng.integers(0, 5, 30), rng.integers(0, 2, 10), rng.integers(0, 2, 30))
    from amfor.evaluation import part_distance
    assert_same(evaluate_features(qf, gf, *ids, q_vis=qv, g_vis=gv, chunk_size=3),
                evaluate_rank(part_distance(qf, gf, qv, gv), *ids))
    with pytest.raises(ValueError, match="qf and gf"):
        evaluate_features(qf, gf[:, 0], *ids)


def test_rank_metrics_op_schema_and_bad_labels(rank_backend):
    if rank_backend != "cpp":
        pytest.skip("checks the C++ op")
    d = torch.rand(3, 7)
    pids = torch.tensor([1, 2, 3]), torch.tensor([1, 1, 2, 2, 3, 3, 0])
    cams = torch.tensor([0, 0, 0]), torch.tensor([0, 1, 0, 1, 0, 1, 1])
    ap, first, inp, valid = torch.ops.amfor.rank_metrics(d, pids[0], pids[1], cams[0], cams[1])
    assert ap.dtype == torch.float64 and first.dtype == torch.int64 and valid.tolist() == [True, True, True]
    with pytest.raises(RuntimeError, match="g_pids must be int64 of length 7"):
        torch.ops.amfor.rank_metrics(d, pids[0], pids[1][:6], cams[0], cams[1])
