"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) in bounded memory.

The classic implementation builds the full (Q+G)^2 float matrices (3 GB in float64 at Market size).
Here the N = Q+G rows of the original distance are produced in chunks and reduced on the fly to
what the algorithm needs: each row's maximum (normalisation), its k1+1 nearest neighbours, and the
distances to its k-reciprocal expansion set. V and its query expansion are sparse (scipy CSR), and the
Jaccard distance sum_k min(V_ik, V_jk) is accumulated over sparse pairs, query chunk by query chunk.
Distances are float32 like the classic code; the result matches it to ~1e-6 (tests/evaluation).
Assumes a symmetric original distance, as every caller has (features or q/g/(q,q)/(g,g) blocks).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import torch

from ._inputs import as_tensor, check_matrix
from .distances import pairwise_distance

RowFn = Callable[[int, int], torch.Tensor]  # rows [start, end) of the original N x N distance


def stable_topk_smallest(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [R, k] of the k smallest entries per row, ordered as a stable ascending sort would."""
    k = min(k, x.shape[1])
    vals, idx = torch.topk(x, k, dim=1, largest=False, sorted=True)
    kth = vals[:, -1:]
    # rows whose k-th value is tied beyond k: topk may pick any of the tied entries; redo them exactly
    crowded = ((x <= kth).sum(1) > k).nonzero(as_tuple=True)[0]
    if crowded.numel():
        idx[crowded] = torch.sort(x[crowded], dim=1, stable=True)[1][:, :k]
    order = torch.sort(idx, dim=1)[1]  # by index, then stably by value = (value, index) order
    idx = idx.gather(1, order)
    return idx.gather(1, torch.sort(x.gather(1, idx), dim=1, stable=True)[1])


def _neighbours(rows: RowFn, n: int, k: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of the normalised distance: max (for normalising) and the k nearest neighbours [N, k]."""
    maxes, knn = [], []
    for s in range(0, n, chunk):
        d = rows(s, min(n, s + chunk))
        m = d.max(1, keepdim=True).values
        maxes.append(m[:, 0])
        knn.append(stable_topk_smallest(d / m, k))
    return torch.cat(maxes), torch.cat(knn)


def _reciprocal(knn: torch.Tensor, k: int) -> torch.Tensor:
    """[N, k+1] indices of the k-reciprocal neighbours of each row, -1 where not reciprocal."""
    fwd = knn[:, :k + 1]
    back = fwd[fwd]  # [N, k+1, k+1]: neighbours of neighbours
    ok = (back == torch.arange(knn.shape[0])[:, None, None]).any(-1)
    return torch.where(ok, fwd, -1)


def _expansion_sets(knn: torch.Tensor, k1: int, chunk: int = 2048) -> torch.Tensor:
    """[N, L] k-reciprocal expansion set of each row (sorted, -1 padded).

    A k1-reciprocal neighbour c adds its own round(k1/2)-reciprocal set when more than 2/3 of that set
    lies in the row's k1-reciprocal set (the classic rule).
    """
    rec, half = _reciprocal(knn, k1), _reciprocal(knn, int(np.around(k1 / 2.0)))
    out = []
    for s in range(0, rec.shape[0], chunk):
        r = rec[s:s + chunk]                                      # [c, k1+1]
        cand = half[r.clamp(min=0)]                               # [c, k1+1, kh+1]
        inside = ((cand[..., None] == r[:, None, None, :]) & (cand[..., None] >= 0)).any(-1).sum(-1)
        accept = (r >= 0) & (inside > 2.0 / 3.0 * (cand >= 0).sum(-1))
        cand = torch.where(accept[..., None], cand, -1).flatten(1)
        out.append(_unique_rows(torch.cat([r, cand], 1)))
    width = max(o.shape[1] for o in out)
    return torch.cat([torch.nn.functional.pad(o, (0, width - o.shape[1]), value=-1) for o in out])


def _unique_rows(x: torch.Tensor) -> torch.Tensor:
    """Sorted unique non-negative entries per row, -1 padded at the end, trimmed to the widest row."""
    big = torch.iinfo(x.dtype).max
    x = torch.sort(torch.where(x < 0, big, x), dim=1)[0]
    dup = torch.zeros_like(x, dtype=torch.bool)
    dup[:, 1:] = x[:, 1:] == x[:, :-1]
    x = torch.sort(torch.where(dup, big, x), dim=1)[0]
    width = max(int((x != big).sum(1).max()), 1)
    x = x[:, :width]
    return torch.where(x == big, -1, x)


def _weights(rows: RowFn, maxes: torch.Tensor, sets: torch.Tensor, chunk: int) -> sp.csr_matrix:
    """Sparse V [N, N]: V[i, e] = exp(-d_ie / max_i) normalised over the expansion set e of row i."""
    n = sets.shape[0]
    vals = []
    for s in range(0, n, chunk):
        idx = sets[s:s + chunk]
        d = rows(s, min(n, s + chunk)) / maxes[s:s + chunk, None]
        w = torch.where(idx >= 0, torch.exp(-d.gather(1, idx.clamp(min=0))), 0.0)
        vals.append(w / w.sum(1, keepdim=True))
    vals = torch.cat(vals).numpy().astype(np.float32)
    live = (sets >= 0).numpy()
    r = np.nonzero(live)[0]
    return sp.csr_matrix((vals[live], (r, sets.numpy()[live])), shape=(n, n), dtype=np.float32)


def _query_expand(v: sp.csr_matrix, knn: torch.Tensor, k2: int) -> sp.csr_matrix:
    """Row i of the result = mean of the V rows of i's k2 nearest neighbours (local query expansion)."""
    n = v.shape[0]
    a = sp.csr_matrix((np.ones(n * k2, np.float32), (np.repeat(np.arange(n), k2), knn[:, :k2].numpy().ravel())),
                      shape=(n, n))
    return ((a @ v) * np.float32(1.0 / k2)).astype(np.float32).tocsr()


def _jaccard_min_sum(vq: sp.csr_matrix, vg_csc: sp.csc_matrix) -> np.ndarray:
    """[c, G]: sum_k min(vq[i, k], vg[j, k]) over the sparse pairs sharing a column k."""
    coo = vq.tocoo()
    starts, ends = vg_csc.indptr[coo.col], vg_csc.indptr[coo.col + 1]
    lens = ends - starts
    first = np.repeat(starts - (np.cumsum(lens) - lens), lens)
    pos = np.arange(int(lens.sum())) + first
    ri, a = np.repeat(coo.row, lens), np.repeat(coo.data, lens)
    key = ri.astype(np.int64) * vg_csc.shape[0] + vg_csc.indices[pos]
    total = np.bincount(key, weights=np.minimum(a, vg_csc.data[pos]), minlength=vq.shape[0] * vg_csc.shape[0])
    return total.reshape(vq.shape[0], vg_csc.shape[0])


def k_reciprocal_rerank(rows: RowFn, num_query: int, num_all: int, k1: int = 20, k2: int = 6,
                        lambda_value: float = 0.3, chunk_size: int = 1024, query_chunk: int = 64) -> np.ndarray:
    """Re-ranked query x gallery distance [Q, G] float32 from the original distance given by rows.

    rows(s, e) -> [e - s, N] float32: rows s..e-1 of the symmetric original distance over the N = Q + G
    images (queries first). Memory: O(chunk_size x N) dense plus O(N x |expansion|) sparse.
    """
    if not (k1 >= 1 and k2 >= 1 and 0.0 <= lambda_value <= 1.0):
        raise ValueError(f"need k1 >= 1, k2 >= 1 and 0 <= lambda_value <= 1, got {k1}, {k2}, {lambda_value}")
    maxes, knn = _neighbours(rows, num_all, k1 + 1, chunk_size)
    v = _weights(rows, maxes, _expansion_sets(knn, k1), chunk_size)
    if k2 != 1:
        v = _query_expand(v, knn, k2)
    vg = v[num_query:].tocsc()
    out = np.empty((num_query, num_all - num_query), np.float32)
    for s in range(0, num_query, query_chunk):
        e = min(num_query, s + query_chunk)
        temp = _jaccard_min_sum(v[s:e], vg)
        jaccard = 1.0 - temp / (2.0 - temp)
        original = (rows(s, e)[:, num_query:] / maxes[s:e, None]).numpy()
        out[s:e] = jaccard * (1.0 - lambda_value) + original * lambda_value
    return out


def re_ranking(qf, gf, k1: int = 20, k2: int = 6, lambda_value: float = 0.3, metric: str = "euclidean",
               q_vis=None, g_vis=None, chunk_size: int = 1024) -> np.ndarray:
    """k-reciprocal re-ranking from features: qf [Q, D] (or [Q, P, D] parts with q_vis [Q, P]), gf likewise.

    The original distance is `pairwise_distance` (squared Euclidean on L2-normalised features, or the
    AMFOR part distance), computed in row chunks on the features' device. Returns [Q, G] float32 numpy.
    """
    qf, gf = as_tensor(qf, "qf").float(), as_tensor(gf, "gf").float()
    feats = torch.cat([qf, gf.to(qf.device)])
    vis = None
    if q_vis is not None or g_vis is not None:
        qv = as_tensor(q_vis, "q_vis") if q_vis is not None else torch.ones(qf.shape[:2])
        gv = as_tensor(g_vis, "g_vis") if g_vis is not None else torch.ones(gf.shape[:2])
        vis = torch.cat([qv.float(), gv.float()]).to(qf.device)

    def rows(s: int, e: int) -> torch.Tensor:
        sub = vis[s:e] if vis is not None else None
        return pairwise_distance(feats[s:e], feats, metric, sub, vis).float().cpu()

    return k_reciprocal_rerank(rows, qf.shape[0], feats.shape[0], k1, k2, lambda_value, chunk_size)


def re_ranking_distmat(q_g_dist, q_q_dist, g_g_dist, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                       chunk_size: int = 1024) -> np.ndarray:
    """The classic interface: precomputed [Q, G], [Q, Q], [G, G] distances -> re-ranked [Q, G] float32."""
    qg = check_matrix(q_g_dist, "q_g_dist").float().cpu()
    qq = check_matrix(q_q_dist, "q_q_dist").float().cpu()
    gg = check_matrix(g_g_dist, "g_g_dist").float().cpu()
    nq, ng = qg.shape
    if qq.shape != (nq, nq) or gg.shape != (ng, ng):
        raise ValueError(f"q_q_dist must be [{nq}, {nq}] and g_g_dist [{ng}, {ng}] for q_g_dist [{nq}, {ng}], got "
                         f"{tuple(qq.shape)} and {tuple(gg.shape)}")

    def rows(s: int, e: int) -> torch.Tensor:
        parts = []
        if s < nq:
            parts.append(torch.cat([qq[s:min(e, nq)], qg[s:min(e, nq)]], 1))
        if e > nq:
            lo, hi = max(s - nq, 0), e - nq
            parts.append(torch.cat([qg[:, lo:hi].T, gg[lo:hi]], 1))
        return torch.cat(parts)

    return k_reciprocal_rerank(rows, nq, nq + ng, k1, k2, lambda_value, chunk_size)
