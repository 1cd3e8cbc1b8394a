"""Second stage of a search: re-order each query's top-k shortlist with what the index does not compute.

- `rescore_parts`: AMFOR's visibility-weighted part distance (`amfor.evaluation.distances.pairwise_distance` on
  [N, 1+P, D] features with their visibility), between each query and its own shortlist only.
- `rerank_shortlist`: k-reciprocal re-ranking (`amfor.evaluation.reranking.re_ranking`) over the queries and the
  union of their shortlists (not the full gallery), on the global features or the part distance.

Both take the shortlist as the index returns it (indices [Q, k], -1 where an approximate index found fewer) and
return (distances [Q, k] float32 ascending, indices [Q, k] int64) re-ordered, -1 entries last at +inf.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from amfor.evaluation.distances import pairwise_distance
from amfor.evaluation.reranking import re_ranking
from amfor.utils.threads import torch_threads

from .index import GalleryIndex, SearchError


def part_tensors(gallery) -> tuple[torch.Tensor, torch.Tensor]:
    """The gallery's parts [N, 1+P, D] and visibility [N, 1+P] as float32 CPU tensors, views where they can be (of a
    memory map too); gallery: a GalleryIndex or a (parts, visibility) pair of arrays or tensors."""
    if isinstance(gallery, GalleryIndex):
        if gallery.parts is None:
            raise SearchError("the index holds no part features (build it from a features file with parts)")
        pair = gallery.parts, gallery.visibility
    else:
        pair = gallery
    out = []
    for x in pair:
        if not isinstance(x, torch.Tensor):
            x = np.asarray(x, dtype=np.float32)
            with warnings.catch_warnings():  # a read-only array (memory map): only read here
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                x = torch.from_numpy(x)
        out.append(x.detach().cpu().float())
    return out[0], out[1]


def gallery_parts(gallery, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Parts [R, 1+P, D] and visibility [R, 1+P] of gallery rows [R] (copies); gallery as for `part_tensors`."""
    parts, vis = part_tensors(gallery)
    rows = torch.from_numpy(np.asarray(rows, dtype=np.int64))
    return parts.index_select(0, rows), vis.index_select(0, rows)




def _shortlist(shortlist, num_query: int) -> torch.Tensor:
    idx = torch.as_tensor(shortlist).long()
    if idx.dim() != 2 or idx.shape[0] != num_query:
        raise SearchError(f"the shortlist must be [Q, k] with Q = {num_query} queries, got {list(idx.shape)}")
    return idx


def _ordered(dist: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by distance (stable: ties keep the shortlist's order); -1 entries go last at +inf."""
    dist = dist.float().masked_fill(idx < 0, float("inf"))
    dist, order = torch.sort(dist, dim=1, stable=True)
    return dist, idx.gather(1, order)


def _query_visibility(q_vis, q_parts: torch.Tensor) -> torch.Tensor:
    if q_vis is None:
        return torch.ones(q_parts.shape[:2])
    return torch.as_tensor(q_vis).float()


def rescore_parts(q_parts, shortlist, gallery, q_vis=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Part distance of each query [Q, 1+P, D] (visibility q_vis [Q, 1+P]) to its shortlist [Q, k].

    gallery: the GalleryIndex (its stored parts and visibility) or a (parts [N, 1+P, D], visibility [N, 1+P]) pair.
    Returns (distances [Q, k], indices [Q, k]) sorted by the part distance, ascending.
    """
    q_parts = torch.as_tensor(q_parts).float()
    if q_parts.dim() != 3:
        raise SearchError(f"query parts must be [Q, 1+P, D], got {list(q_parts.shape)}")
    idx = _shortlist(shortlist, q_parts.shape[0])
    q_vis = _query_visibility(q_vis, q_parts)
    parts, vis = part_tensors(gallery)
    if parts.shape[1:] != q_parts.shape[1:]:
        raise SearchError(f"query parts are {list(q_parts.shape[1:])} per image, the gallery's {list(parts.shape[1:])}")
    rows = idx.clamp(min=0)
    dist = torch.empty(idx.shape)
    # One query's shortlist at a time, gathered into the same buffers: a fresh k x (1+P) x D array a query (2.7 MB at
    # k = 100, D = 768) is page-faulted in anew each time, which costs more than the distances.
    gp = torch.empty((idx.shape[1], *parts.shape[1:]))
    gv = torch.empty((idx.shape[1], vis.shape[1]))
    with torch_threads(1):  # the per-query ops (k x D) are too small to split: a fork and join costs more
        for q in range(idx.shape[0]):
            torch.index_select(parts, 0, rows[q], out=gp)
            torch.index_select(vis, 0, rows[q], out=gv)
            dist[q] = pairwise_distance(q_parts[q:q + 1], gp, q_vis=q_vis[q:q + 1], g_vis=gv)[0]
    return _ordered(dist, idx)


def rerank_shortlist(queries, shortlist, gallery: GalleryIndex, k1: int = 20, k2: int = 6,
                     lambda_value: float = 0.3, q_parts=None, q_vis=None) -> tuple[torch.Tensor, torch.Tensor]:
    """k-reciprocal re-ranking of each query's shortlist, computed over the queries and the union U of the
    shortlists (Q + U images, not the whole gallery).

    queries: global features [Q, D]; with q_parts [Q, 1+P, D] (and q_vis) the original distance is the part
    distance to the gallery's stored parts instead. k1 and k2 shrink to what Q + U images allow.
    Returns (re-ranked distances [Q, k], indices [Q, k]), ascending.
    """
    queries = torch.as_tensor(queries).float()
    if queries.dim() != 2 or queries.shape[1] != gallery.dim:
        raise SearchError(f"queries must be [Q, {gallery.dim}] like the index, got {list(queries.shape)}")
    idx = _shortlist(shortlist, queries.shape[0])
    union, inverse = np.unique(idx.numpy(), return_inverse=True)
    inverse = torch.from_numpy(inverse.reshape(idx.shape).astype(np.int64))
    if union.size and union[0] < 0:  # -1 (not found) sorts first: drop it from the gallery side
        union, inverse = union[1:], (inverse - 1).clamp(min=0)
    if union.size == 0:
        return _ordered(torch.zeros(idx.shape), idx)
    n = queries.shape[0] + union.size
    k1 = max(1, min(k1, n - 1))
    k2 = max(1, min(k2, k1 + 1))
    if q_parts is not None:
        q_parts = torch.as_tensor(q_parts).float()
        gp, gv = gallery_parts(gallery, union)
        dist = re_ranking(q_parts, gp, k1, k2, lambda_value, q_vis=_query_visibility(q_vis, q_parts), g_vis=gv)
    else:
        q = torch.nn.functional.normalize(queries, dim=1)
        dist = re_ranking(q, gallery.features(union), k1, k2, lambda_value)
    return _ordered(torch.from_numpy(dist).gather(1, inverse), idx)
