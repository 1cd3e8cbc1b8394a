"""Market-1501 protocol metrics (CMC, mAP, mINP), vectorised and chunked over queries.

The rank of every true match is computed without sorting the gallery: the matches of each query are
sorted (few per query), every kept gallery entry is bucketed among them with `searchsorted`, and a
cumulative count gives how many kept entries precede each match. Ties are broken by gallery index,
exactly as a stable sort of the distances would. Cost per query: O(G log M) for M matches.

On the CPU the same algorithm runs as a C++ kernel (`torch.ops.amfor.rank_metrics`, csrc/cpu/rank_metrics.cpp,
one thread per query, no Q x G temporaries) when amfor._C is built and the backend is auto or cpp; elsewhere
(GPU tensors, `use_backend("torch")`) the vectorised PyTorch version below runs.
"""

from __future__ import annotations

import numpy as np
import torch

from amfor.ops._backend import available_backends, current_backend

from ._inputs import check_labels, check_matrix


def match_ranks(dist: torch.Tensor, q_pids: torch.Tensor, g_pids: torch.Tensor, q_camids: torch.Tensor,
                g_camids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1-based ranks of the true matches of each query in its filtered, stably sorted gallery list.

    dist: [C, G] finite; q_*: [C]; g_*: [G]. Gallery entries with the query's pid AND camera are removed.
    Returns ranks [C, M] (int64, ascending per row, padded with a huge value) and match counts [C].
    """
    same_pid = g_pids[None, :] == q_pids[:, None]
    junk = same_pid & (g_camids[None, :] == q_camids[:, None])
    match = same_pid ^ junk
    counts = match.sum(1)
    md, mi = _sorted_matches(dist, match, counts)
    num_q, m = md.shape
    # junk goes to +inf: behind every real match, so it never counts as "in front" of one
    masked = dist.masked_fill(junk, float("inf"))
    bucket = torch.searchsorted(md, masked, right=True, out_int32=True)  # matches with d_m <= d_j
    flat = bucket + torch.arange(0, num_q * (m + 1), m + 1, device=dist.device, dtype=torch.int32)[:, None]
    before = _count_strictly_closer(flat, num_q, m) + _count_tied_before(masked, md, mi, flat)
    ranks = torch.where(torch.arange(m, device=dist.device)[None] < counts[:, None], before + 1,
                        torch.iinfo(torch.long).max)
    return ranks, counts


def _sorted_matches(dist: torch.Tensor, match: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Match distances and gallery indices per query, sorted by (distance, index), padded with (inf, G)."""
    num_q, num_g = dist.shape
    m = max(int(counts.max()) if counts.numel() else 0, 1)
    rows, cols = match.nonzero(as_tuple=True)  # row-major: indices ascend within a row
    pos = torch.arange(rows.numel(), device=dist.device) - (counts.cumsum(0) - counts)[rows]
    md = torch.full((num_q, m), float("inf"), dtype=dist.dtype, device=dist.device)
    mi = torch.full((num_q, m), num_g, dtype=torch.long, device=dist.device)
    md[rows, pos], mi[rows, pos] = dist[rows, cols], cols
    md, order = torch.sort(md, dim=1, stable=True)  # stable: equal distances keep index order
    return md, mi.gather(1, order)


def _count_strictly_closer(flat: torch.Tensor, num_q: int, m: int) -> torch.Tensor:
    """[C, M]: gallery entries strictly closer than each sorted match.

    `flat` = row * (M + 1) + bucket, bucket_j = number of matches with d_m <= d_j: entry j is strictly
    closer than the matches at sorted positions >= bucket_j, so the cumulated histogram counts them.
    """
    hist = torch.bincount(flat.flatten(), minlength=num_q * (m + 1)).view(num_q, m + 1)
    return hist.cumsum(1)[:, :m]


def _count_tied_before(dist: torch.Tensor, md: torch.Tensor, mi: torch.Tensor, flat: torch.Tensor,
                       block: int = 1 << 16) -> torch.Tensor:
    """[C, M]: entries at a distance equal to a match's and with a smaller gallery index (stable order).

    Entry j ties with some match iff the last match with d_m <= d_j has d_m == d_j. Each match ties
    with itself (not counted: its index is not smaller); junk (+inf) ties only with the padding.
    """
    ext = torch.cat([torch.full_like(md[:, :1], -float("inf")), md], 1)
    q, j = (ext.flatten()[flat] == dist).nonzero(as_tuple=True)
    out = torch.zeros_like(mi)
    for s in range(0, q.numel(), block):
        qs, js = q[s:s + block], j[s:s + block]
        hit = (md[qs] == dist[qs, js][:, None]) & (mi[qs] > js[:, None])
        out.index_add_(0, qs, hit.long())
    return out


def query_metrics(ranks: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-query AP, first-match rank and INP (float64 / int64, [C]) from `match_ranks` output."""
    valid = counts > 0
    m = ranks.shape[1]
    idx = torch.arange(1, m + 1, device=ranks.device, dtype=torch.float64)
    live = idx[None] <= counts[:, None]
    prec = torch.where(live, idx[None] / ranks.clamp(max=2**52).double(), 0.0)
    n = counts.clamp(min=1).double()
    ap = prec.sum(1) / n
    last = ranks.gather(1, (counts - 1).clamp(min=0)[:, None])[:, 0]
    inp = n / last.clamp(max=2**52).double()
    return ap, ranks[:, 0], inp, valid


def _use_cpp(device: torch.device) -> bool:
    return device.type == "cpu" and current_backend() in ("auto", "cpp") and "cpp" in available_backends("cpu")


def per_query_metrics(dist: torch.Tensor, q_pids: torch.Tensor, g_pids: torch.Tensor, q_camids: torch.Tensor,
                      g_camids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """AP (float64), first-match rank (int64), INP (float64) and validity (bool) of each query, all [C].

    dist: [C, G] float; labels int64 [C] / [G]. The C++ kernel on CPU, else match_ranks + query_metrics.
    """
    if _use_cpp(dist.device):
        return torch.ops.amfor.rank_metrics(dist, q_pids, g_pids, q_camids, g_camids)
    return query_metrics(*match_ranks(dist, q_pids, g_pids, q_camids, g_camids))


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
