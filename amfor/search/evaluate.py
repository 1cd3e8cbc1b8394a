"""The Market-1501 protocol (mAP, CMC, mINP) on ranked lists, as a gallery index returns them.

A ranked list is indices [Q, k] into the gallery, closest first (-1: nothing found). As in `amfor.evaluation`,
gallery entries with the query's pid and camera are removed, and a query without a true match in the whole gallery
is not counted. A list that stops at k < G holds only part of the ranking: a true match it does not reach adds 0
to AP (AP = sum of precision at the retrieved matches / all of the query's matches), the query's INP is 0 unless
every match is retrieved, and CMC counts only first matches inside the list. With k = G on an exact index the
metrics are `evaluate_features`' (tests/search/test_evaluate.py).
"""

from __future__ import annotations

import numpy as np
import torch

from amfor.evaluation._inputs import as_tensor
from amfor.evaluation.rank import summarize

from .index import GalleryIndex, SearchError


def _labels(values, name: str, n: int) -> torch.Tensor:
    t = as_tensor(values, name)
    if t.dim() != 1 or t.numel() != n:
        raise SearchError(f"{name} must be a vector of length {n}, got shape {list(t.shape)}")
    if t.is_floating_point() and not torch.equal(t, t.round()):
        raise SearchError(f"{name} must hold integers")
    return t.long().cpu()


def match_counts(q_pids, g_pids, q_camids, g_camids) -> torch.Tensor:
    """[Q] int64: gallery entries with the query's pid and another camera (its true matches), counted without a
    Q x G matrix."""
    def pair_ids(*cols):  # dense ids of the (column...) tuples of queries then gallery
        keys = np.stack([torch.cat(c).numpy() for c in cols], 1)
        return np.unique(keys, axis=0, return_inverse=True)[1].reshape(-1)

    nq = q_pids.shape[0]
    pid = pair_ids((q_pids, g_pids))
    pid_cam = pair_ids((q_pids, g_pids), (q_camids, g_camids))
    same_pid = np.bincount(pid[nq:], minlength=pid.max() + 1)[pid[:nq]]
    same_cam = np.bincount(pid_cam[nq:], minlength=pid_cam.max() + 1)[pid_cam[:nq]]
    return torch.from_numpy(same_pid - same_cam)


def ranked_list_metrics(indices, q_pids, g_pids, q_camids, g_camids, total: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, ...]:
    """AP (float64), first-match rank (int64, G + 1 when not in the list), INP (float64) and validity (bool), [Q].

    indices: [Q, k] gallery rows, closest first; pids/camids [Q] and [G]; total: `match_counts` when known.
    """
    idx = torch.as_tensor(indices).long().cpu()
    if idx.dim() != 2:
        raise SearchError(f"ranked lists must be [Q, k], got {list(idx.shape)}")
    nq, ng = idx.shape[0], as_tensor(g_pids, "g_pids").numel()
    q_pids, q_camids = _labels(q_pids, "q_pids", nq), _labels(q_camids, "q_camids", nq)
    g_pids, g_camids = _labels(g_pids, "g_pids", ng), _labels(g_camids, "g_camids", ng)
    if idx.numel() and int(idx.max()) >= ng:
        raise SearchError(f"ranked lists index row {int(idx.max())} of a gallery of {ng}")
    total = match_counts(q_pids, g_pids, q_camids, g_camids) if total is None else total
    # only the entries with the query's pid matter (a few per row): work on those (row, column) pairs
    if idx.numel() and int(idx.min()) < -1:
        raise SearchError(f"ranked lists hold row {int(idx.min())}: rows are >= 0, or -1 for nothing found")
    # -1 (nothing found) picks the appended sentinel, a pid no query has
    g_pids = torch.cat([g_pids, (q_pids.min() - 1).reshape(1) if nq else g_pids.new_zeros(1)])
    r, c = (g_pids[idx] == q_pids[:, None]).nonzero(as_tuple=True)  # row-major order
    junk = g_camids[idx[r, c]] == q_camids[r]
    start = torch.searchsorted(r, r)  # the first pair of each pair's row

    def before(flag: torch.Tensor) -> torch.Tensor:  # pairs of the same row before each pair that have `flag`
        excl = flag.long().cumsum(0) - flag.long()
        return excl - excl[start]

    pos = c + 1 - before(junk)  # 1-based rank once the junk in front is removed (-1 entries come last)
    hits = before(~junk) + 1
    m, rm = ~junk, r[~junk]
    ap = torch.zeros(nq, dtype=torch.float64).index_add_(0, rm, hits[m].double() / pos[m].double())
    ap = ap / total.clamp(min=1).double()
    found = torch.bincount(rm, minlength=nq)
    first = torch.full((nq,), ng + 1, dtype=torch.long).scatter_reduce_(0, rm, pos[m], "amin")
    last = torch.zeros(nq, dtype=torch.long).scatter_reduce_(0, rm, pos[m], "amax")
    valid = total > 0
    inp = torch.where(valid & (found == total), total.double() / last.clamp(min=1).double(), 0.0)
    return ap, first.long(), inp, valid


def evaluate_ranked(indices, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50,
                    return_per_query: bool = False) -> dict:
    """mAP, mINP, CMC [max_rank] and num_valid_queries of ranked lists [Q, k] (see the module docstring)."""
    return summarize(*ranked_list_metrics(indices, q_pids, g_pids, q_camids, g_camids), max_rank, return_per_query)


def evaluate_index(index: GalleryIndex, queries, q_pids, g_pids, q_camids, g_camids=None, k: int | None = None,
                   max_rank: int = 50, chunk_size: int | None = None, **search_params) -> dict:
    """The protocol on the index's ranked lists: queries [Q, D] searched for their top k (default: the whole
    gallery), in query chunks of about 4M list entries. g_camids defaults to the camids stored in the index.

    search_params go to `index.search` (ivf `nprobe`, hnsw `ef_search`). Returns `evaluate_ranked`'s dict.
    """
    if g_camids is None:
        if index.camids is None:
            raise SearchError("g_camids not given and the index holds no camids")
        g_camids = index.camids
    k = len(index) if k is None else k
    queries = as_tensor(queries, "queries")
    nq, ng = queries.shape[0], len(index)
    q_pids, q_camids = _labels(q_pids, "q_pids", nq), _labels(q_camids, "q_camids", nq)
    g_pids, g_camids = _labels(g_pids, "g_pids", ng), _labels(g_camids, "g_camids", ng)
    total = match_counts(q_pids, g_pids, q_camids, g_camids)
    chunk = chunk_size or max(1, (1 << 22) // max(k, 1))
    results = [[], [], [], []]
    for s in range(0, nq, chunk):
        _, idx = index.search(queries[s:s + chunk], k, **search_params)
        sl = slice(s, s + chunk)
        metrics = ranked_list_metrics(idx, q_pids[sl], g_pids, q_camids[sl], g_camids, total[sl])
        for acc, val in zip(results, metrics, strict=True):
            acc.append(val)
    return summarize(*(torch.cat(r) for r in results), max_rank)
