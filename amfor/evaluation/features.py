"""Feature extraction (with flip averaging) and chunked evaluation straight from features.

`evaluate_features` never holds the full Q x G matrix: per chunk of queries it computes distances,
the ranks of the true matches and the per-query metrics, then discards the chunk. Memory is
O(chunk_size x G), so MSMT17 (11,659 x 82,161) fits where a float32 matrix alone would be 3.8 GB.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ._inputs import as_tensor, check_labels
from .distances import pairwise_distance
from .rank import per_query_metrics, summarize


def flip_average(feat: torch.Tensor, feat_flipped: torch.Tensor,
                 part_pairs: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
    """Mean of the features of an image and of its mirror image: [B, D] or [B, P, D].

    For part features whose left/right parts are in image space, pass `part_pairs` (feature indices,
    e.g. ((2, 3), (5, 6), (7, 8)) for [global, 8 parts]) so the mirror's parts are swapped back first.
    """
    if feat.shape != feat_flipped.shape:
        raise ValueError(f"feat and feat_flipped differ in shape: {tuple(feat.shape)} vs {tuple(feat_flipped.shape)}")
    if part_pairs:
        perm = list(range(feat.shape[1]))
        for a, b in part_pairs:
            perm[a], perm[b] = b, a
        feat_flipped = feat_flipped[:, perm]
    return (feat + feat_flipped) / 2


@torch.no_grad()
def extract_features(model: Callable[[torch.Tensor], torch.Tensor], loader, flip: bool = False,
                     device: torch.device | str | None = None, part_pairs=None) -> dict:
    """Run `model` over `loader` (dict batches with "img", "pid", "camid"); returns feats, pids, camids, paths.

    With `flip` the features of the horizontally mirrored image are averaged in (see `flip_average`).
    """
    feats, pids, camids, paths = [], [], [], []
    for batch in loader:
        img = batch["img"].to(device) if device is not None else batch["img"]
        f = model(img)
        if flip:
            f = flip_average(f, model(img.flip(-1)), part_pairs)
        feats.append(f.float().cpu())
        pids.append(torch.as_tensor(batch["pid"]))
        camids.append(torch.as_tensor(batch["camid"]))
        paths.extend(batch.get("path", []))
    return {"feats": torch.cat(feats), "pids": torch.cat(pids), "camids": torch.cat(camids), "paths": paths}


def evaluate_features(qf, gf, q_pids, g_pids, q_camids, g_camids, metric: str = "euclidean", q_vis=None,
                      g_vis=None, chunk_size: int | None = None, max_rank: int = 50, device=None,
                      return_per_query: bool = False) -> dict:
    """Metrics of `evaluate_rank` computed from features in query chunks (bounded memory).

    qf: [Q, D] or [Q, P, D] (part features, with optional visibility q_vis [Q, P]); gf likewise.
    `device`: where to compute (default: where gf lies). `chunk_size` None: about 16M distances a chunk.
    """
    device = torch.device(device) if device is not None else (gf.device if isinstance(gf, torch.Tensor) else None)
    qf, gf = as_tensor(qf, "qf", device), as_tensor(gf, "gf", device)
    if qf.dim() not in (2, 3) or qf.dim() != gf.dim():
        raise ValueError(f"qf and gf must both be [N, D] or [N, P, D], got {tuple(qf.shape)} and {tuple(gf.shape)}")
    labels = check_labels((qf.shape[0], gf.shape[0]), q_pids, g_pids, q_camids, g_camids, gf.device)
    q_vis = as_tensor(q_vis, "q_vis", gf.device) if q_vis is not None else None
    g_vis = as_tensor(g_vis, "g_vis", gf.device) if g_vis is not None else None
    chunk = chunk_size or max(1, (1 << 24) // max(gf.shape[0], 1))
    results = [[], [], [], []]
    for s in range(0, qf.shape[0], chunk):
        sl = slice(s, s + chunk)
        dist = pairwise_distance(qf[sl], gf, metric, q_vis[sl] if q_vis is not None else None, g_vis)
        metrics = per_query_metrics(dist, labels[0][sl], labels[1], labels[2][sl], labels[3])
        for acc, val in zip(results, metrics, strict=True):
            acc.append(val.cpu())
    return summarize(*(torch.cat(r) for r in results), max_rank, return_per_query)
