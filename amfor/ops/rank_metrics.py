"""Per-query Market-1501 metrics (AP, first-match rank, INP, validity): the op under amfor.evaluation.rank.

    rank_metrics(dist [C, G], q_pids [C], g_pids [G], q_camids [C], g_camids [G]) -> (ap, first, inp, valid) [C]

The reference is vectorised PyTorch (runs on CPU and GPU): the rank of every true match is computed without
sorting the gallery: the matches of each query are sorted (few per query), every kept gallery entry is
bucketed among them with `searchsorted`, and a cumulative count gives how many kept entries precede each
match. Ties are broken by gallery index, exactly as a stable sort of the distances would. Cost per query:
O(G log M) for M matches. The C++ CPU kernel (`torch.ops.amfor.rank_metrics`, csrc/cpu/rank_metrics.cpp,
one thread per query, no C x G temporaries) runs the same algorithm; `auto` takes it on CPU. There is no
Triton or CUDA implementation: forcing one raises (the one error text of amfor.ops._registry).
"""

from __future__ import annotations

import torch

from amfor.ops import _registry

AUTO_ORDER = {"cpu": ("cpp",)}
DISPATCH = _registry.declare("rank_metrics", AUTO_ORDER, implementations=("torch", "cpp"))


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


def rank_metrics_reference(dist: torch.Tensor, q_pids: torch.Tensor, g_pids: torch.Tensor, q_camids: torch.Tensor,
                           g_camids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The specification: match_ranks, then query_metrics.  dist [C, G]; labels int64 -> 4 x [C]."""
    return query_metrics(*match_ranks(dist, q_pids, g_pids, q_camids, g_camids))


def _fake(dist, q_pids, g_pids, q_camids, g_camids):
    C = dist.shape[0]
    f64 = dist.new_empty(C, dtype=torch.float64)
    return f64, dist.new_empty(C, dtype=torch.int64), torch.empty_like(f64), dist.new_empty(C, dtype=torch.bool)


_COMPILED = (_registry.register_implementation((_registry.OpSpec("rank_metrics", _fake),), "") or {}).get(
    "rank_metrics")


def rank_metrics(dist: torch.Tensor, q_pids: torch.Tensor, g_pids: torch.Tensor, q_camids: torch.Tensor,
                 g_camids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """AP (float64), first-match rank (int64), INP (float64) and validity (bool) of each query, all [C].

    dist: [C, G] float, finite; labels int64 [C] / [G] on dist's device (amfor.evaluation validates them).
    Gallery entries with the query's pid AND camera are removed; ties go to the lower gallery index.
    """
    backend = DISPATCH.backend(dist.device, dist.dtype)
    if backend == "torch":
        return rank_metrics_reference(dist, q_pids, g_pids, q_camids, g_camids)
    return _COMPILED(dist, q_pids, g_pids, q_camids, g_camids)
