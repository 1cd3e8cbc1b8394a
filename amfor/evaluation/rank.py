"""Market-1501 protocol metrics (CMC, mAP, mINP), vectorised and chunked over queries.

The per-query metrics are the op `amfor.ops.rank_metrics` (amfor/ops/rank_metrics.py: the vectorised PyTorch
reference, which ranks every true match without sorting the gallery, ties broken by gallery index as a stable
sort would, and the C++ CPU kernel that `auto` takes on CPU); this module validates, chunks and averages.
`use_backend("torch")` forces the reference; forcing a backend the op lacks (triton, cuda) raises.
"""

from __future__ import annotations

import numpy as np
import torch

from amfor.ops.rank_metrics import match_ranks, query_metrics, rank_metrics  # noqa: F401 - re-exported

from ._inputs import check_labels, check_matrix


def per_query_metrics(dist: torch.Tensor, q_pids: torch.Tensor, g_pids: torch.Tensor, q_camids: torch.Tensor,
                      g_camids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """AP (float64), first-match rank (int64), INP (float64) and validity (bool) of each query, all [C].

    dist: [C, G] float; labels int64 [C] / [G]. The op amfor.ops.rank_metrics (C++ kernel on CPU, else the
    vectorised reference), chosen by the backend like every amfor op.
    """
    return rank_metrics(dist, q_pids, g_pids, q_camids, g_camids)


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50, chunk_size: int = 256,
                  return_per_query: bool = False) -> dict:
    """CMC, mAP and mINP under the Market-1501 protocol (see docs/data.md).

    distmat: [Q, G] numpy array or tensor (CPU or GPU; computed where it lies), smaller = closer;
    pids/camids: [Q] and [G]. Returns {"mAP", "mINP": float, "cmc": np.ndarray [max_rank],
    "num_valid_queries": int}, plus per-query "AP" [Q] (NaN for skipped queries) and "valid" [Q] when
    `return_per_query`. Raises ValueError on mismatched inputs or when no query has a true match.
    """
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    dist = check_matrix(distmat, "distmat", finite=True)
    labels = check_labels(tuple(dist.shape), q_pids, g_pids, q_camids, g_camids, dist.device)
    aps, firsts, inps, valids = [], [], [], []
    for s in range(0, dist.shape[0], chunk_size):
        sl = slice(s, s + chunk_size)
        metrics = per_query_metrics(dist[sl], labels[0][sl], labels[1], labels[2][sl], labels[3])
        for acc, val in zip((aps, firsts, inps, valids), metrics, strict=True):
            acc.append(val.cpu())
    return summarize(torch.cat(aps), torch.cat(firsts), torch.cat(inps), torch.cat(valids), max_rank,
                     return_per_query)


def summarize(ap: torch.Tensor, first: torch.Tensor, inp: torch.Tensor, valid: torch.Tensor, max_rank: int,
              return_per_query: bool = False) -> dict:
    """Average per-query results over the valid queries into the reported metrics."""
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError("no valid query: every query lacks a true match in the gallery after removing same-pid "
                         "same-camera entries (check q_pids/g_pids and q_camids/g_camids)")
    first = first[valid].clamp(max=max_rank + 1)
    hist = torch.bincount(first - 1, minlength=max_rank + 1)[:max_rank]
    out = {"mAP": float(ap[valid].mean()), "mINP": float(inp[valid].mean()),
           "cmc": (hist.cumsum(0).double() / num_valid).numpy(), "num_valid_queries": num_valid}
    if return_per_query:
        out["AP"] = torch.where(valid, ap, float("nan")).numpy()
        out["valid"] = valid.numpy()
    return out


def evaluate_rank_classic(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50) -> dict:
    """The classic per-query loop (torchreid/fast-reid formulation, stable argsort); the reference."""
    distmat = np.asarray(distmat)
    q_pids, g_pids, q_camids, g_camids = (np.asarray(a) for a in (q_pids, g_pids, q_camids, g_camids))
    all_cmc, all_ap, all_inp = [], [], []
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind="stable")
        keep = ~((g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i]))
        raw = (g_pids[order] == q_pids[i])[keep].astype(np.int64)
        if not raw.any():
            continue
        cmc = raw.cumsum()
        last = np.nonzero(raw)[0].max()
        all_inp.append(cmc[last] / (last + 1.0))
        cmc = np.minimum(cmc, 1)
        all_cmc.append(np.pad(cmc[:max_rank], (0, max(0, max_rank - len(cmc))), mode="edge"))
        precision = raw.cumsum() / np.arange(1, len(raw) + 1)
        all_ap.append((precision * raw).sum() / raw.sum())
    if not all_ap:
        raise ValueError("no valid query")
    return {"mAP": float(np.mean(all_ap)), "mINP": float(np.mean(all_inp)),
            "cmc": np.asarray(all_cmc, dtype=np.float64).mean(0), "num_valid_queries": len(all_ap)}
