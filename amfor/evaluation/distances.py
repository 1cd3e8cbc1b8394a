"""Distances between query and gallery features: global (Euclidean/cosine) and the AMFOR part distance.

Squared Euclidean on L2-normalised features (= 2 - 2 cos) ranks exactly like cosine distance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

METRICS = ("euclidean", "cosine")


def global_distance(qf: torch.Tensor, gf: torch.Tensor, metric: str = "euclidean", normalize: bool = True
                    ) -> torch.Tensor:
    """qf: [Q, D], gf: [G, D] -> [Q, G] float32 (or the input's float64).

    "euclidean": squared Euclidean (on L2-normalised features when `normalize`); "cosine": 1 - cos.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if qf.dim() != 2 or gf.dim() != 2 or qf.shape[1] != gf.shape[1]:
        raise ValueError(f"qf and gf must be [Q, D] and [G, D] with the same D, got {tuple(qf.shape)} and "
                         f"{tuple(gf.shape)}")
    dtype = torch.float64 if qf.dtype == torch.float64 else torch.float32
    qf, gf = qf.to(dtype), gf.to(dtype)
    if metric == "cosine":
        return 1.0 - F.normalize(qf, dim=1) @ F.normalize(gf, dim=1).T
    if normalize:
        qf, gf = F.normalize(qf, dim=1), F.normalize(gf, dim=1)
    d = qf.pow(2).sum(1, keepdim=True) + gf.pow(2).sum(1)[None] - 2.0 * qf @ gf.T
    return d.clamp_(min=0.0)


def part_distance(qf: torch.Tensor, gf: torch.Tensor, q_vis: torch.Tensor | None = None,
                  g_vis: torch.Tensor | None = None) -> torch.Tensor:
    """AMFOR visibility-weighted part distance, qf: [Q, P, D], gf: [G, P, D], vis: [Q, P] / [G, P] -> [Q, G].

    dist(q, g) = sum_p w_p ||q_p - g_p|| / sum_p w_p with w_p = sqrt(v_qp v_gp) (parts L2-normalised
    here). When no part is visible in both (sum_p w_p == 0), the plain mean over all parts is used, so
    every pair keeps a finite distance on the same scale.
    """
    if qf.dim() != 3 or gf.dim() != 3 or qf.shape[1:] != gf.shape[1:]:
        raise ValueError(f"qf and gf must be [Q, P, D] and [G, P, D] with the same P, D, got {tuple(qf.shape)} "
                         f"and {tuple(gf.shape)}")
    qv = _visibility(q_vis, qf, "q_vis")
    gv = _visibility(g_vis, gf, "g_vis")
    qf, gf = F.normalize(qf.float(), dim=2), F.normalize(gf.float(), dim=2)
    num = torch.zeros(qf.shape[0], gf.shape[0], device=qf.device)
    den, plain = torch.zeros_like(num), torch.zeros_like(num)
    for p in range(qf.shape[1]):
        d = (2.0 - 2.0 * qf[:, p] @ gf[:, p].T).clamp_(min=0.0).sqrt_()
        w = (qv[:, p, None] * gv[None, :, p]).sqrt()
        num += w * d
        den += w
        plain += d
    return torch.where(den > 0, num / den.clamp(min=1e-12), plain / qf.shape[1])


def _visibility(vis: torch.Tensor | None, feats: torch.Tensor, name: str) -> torch.Tensor:
    if vis is None:
        return torch.ones(feats.shape[:2], device=feats.device)
    if tuple(vis.shape) != tuple(feats.shape[:2]):
        raise ValueError(f"{name} must be [{feats.shape[0]}, {feats.shape[1]}], got {tuple(vis.shape)}")
    vis = vis.to(feats.device).float()
    if (vis < 0).any() or (vis > 1).any():
        raise ValueError(f"{name} must lie in [0, 1]")
    return vis


def pairwise_distance(qf: torch.Tensor, gf: torch.Tensor, metric: str = "euclidean", q_vis=None, g_vis=None
                      ) -> torch.Tensor:
    """Global distance for [N, D] features, part distance for [N, P, D] features (metric ignored)."""
    if qf.dim() == 3:
        return part_distance(qf, gf, q_vis, g_vis)
    return global_distance(qf, gf, metric)
