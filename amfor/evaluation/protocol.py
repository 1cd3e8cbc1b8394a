"""Evaluation of a model on query/gallery splits: distributed feature extraction, metrics on rank 0, pictures.

Features come from the eval-mode contract `model(images, camids)` -> {"features": [B, 1+P, D],
"visibility": [B, 1+P]}; the part distance weighs parts by visibility, the global distance uses feature 0.
Every rank extracts a contiguous share of each split; rank 0 gathers and computes the metrics.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..data import build_test_loader, resolve_data_config
from ..data.records import ImageRecord, ReIDData
from ..utils import distributed as du
from .distances import pairwise_distance
from .features import evaluate_features, flip_average
from .rank import evaluate_rank
from .reranking import re_ranking
from .visualize import plot_cmc, ranked_lists

logger = logging.getLogger("amfor.train")

TEST_PAIRS = (("query", "query", "gallery"), ("query_whole", "query_whole", "gallery"))
VAL_PAIRS = (("val", "val_query", "val_gallery"),)


@torch.no_grad()
def extract(model, records: Sequence[ImageRecord], device: torch.device, size: tuple[int, int], batch_size: int,
            num_workers: int, flip: bool = False, global_only: bool = False, amp_dtype=None) -> dict:
    """Features of `records` in order on every rank: {"features": [N, 1+P, D] (or [N, D]), "visibility": [N, 1+P]}.

    Each rank runs its share (`distributed.shard`); the shares are all-gathered. The global RNG state is
    left as it was (loader iterators draw seeds), so evaluating inside training does not change training.
    The images are normalised as the model's `pretrained_cfg` says (`resolve_data_config`); a record's camid -1,
    or one beyond the model's `num_cameras` (a camera of another dataset; one warning), is an unknown camera.
    """
    norm = {k: v for k, v in resolve_data_config(model, size).items() if k != "size"}
    records = known_cameras(records, getattr(model, "num_cameras", None))
    was_training = model.training
    model.eval()
    share = list(records)[du.shard(len(records))]
    feats, vis = [], []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        loader = build_test_loader(share, size=tuple(size), batch_size=batch_size, num_workers=num_workers,
                                   **norm) if share else []
        for batch in loader:
            f, v = _forward(model, batch["img"].to(device), batch["camid"].to(device), global_only, amp_dtype)
            if flip:
                ff, vf = _forward(model, batch["img"].to(device).flip(-1), batch["camid"].to(device), global_only,
                                  amp_dtype)
                pairs = None if global_only else getattr(model, "flip_pairs", None)
                f = flip_average(f, ff, pairs)
                v = flip_average(v, vf, pairs) if v is not None else None
            feats.append(f.float())
            vis.append(v.float() if v is not None else None)
    model.train(was_training)
    out = {"features": _gather(feats, len(records), device)}
    out["visibility"] = None if global_only else _gather(vis, len(records), device)
    return out


def known_cameras(records: Sequence[ImageRecord], num_cameras: int | None) -> Sequence[ImageRecord]:
    """Records with a camera id the model does not have (>= num_cameras > 0) as unknown cameras (-1), one warning."""
    if not num_cameras or all(r.camid < num_cameras for r in records):
        return records
    beyond = sorted({r.camid for r in records if r.camid >= num_cameras})
    logger.warning("camera ids %s are beyond the model's %d cameras: treated as unknown cameras (docs/model.md, "
                   "\"Cameras\")", beyond, num_cameras)
    return [r._replace(camid=-1) if r.camid >= num_cameras else r for r in records]


def _forward(model, img, camid, global_only: bool, amp_dtype):
    ctx = torch.autocast(img.device.type, dtype=amp_dtype) if amp_dtype is not None else torch.autocast(
        img.device.type, enabled=False)
    with ctx:
        out = model(img, camid, global_only=True) if global_only else model(img, camid)
    return out["features"], out.get("visibility")


def _gather(chunks: list, n_total: int, device) -> torch.Tensor:
    local = torch.cat(chunks) if chunks else None
    if du.get_world_size() == 1:
        return local
    # every rank needs the trailing shape: ranks with an empty share learn it from the others
    shapes = du.all_gather_object(tuple(local.shape[1:]) if local is not None else None)
    shape = next(s for s in shapes if s is not None)
    if local is None:
        local = torch.zeros((0, *shape), device=device)
    return du.all_gather_cat(local, n_total)


def split_metrics(qf, gf, q_vis, g_vis, query: Sequence[ImageRecord], gallery: Sequence[ImageRecord], cfg_test,
                  distance: str, rerank: bool = False) -> tuple[dict, torch.Tensor | np.ndarray | None]:
    """Market-1501 protocol metrics, k-reciprocal re-ranked (cfg_test.k1, k2, lambda_value) if `rerank`;
    returns (metrics, re-ranked distmat or None)."""
    q_pids = [r.pid for r in query]
    g_pids = [r.pid for r in gallery]
    q_cams = [r.camid for r in query]
    g_cams = [r.camid for r in gallery]
    if distance == "global":
        qf, gf, q_vis, g_vis = qf[:, 0] if qf.dim() == 3 else qf, gf[:, 0] if gf.dim() == 3 else gf, None, None
    distmat = None
    if rerank:
        distmat = re_ranking(qf, gf, cfg_test.k1, cfg_test.k2, cfg_test.lambda_value, q_vis=q_vis, g_vis=g_vis)
        res = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams)
    else:
        res = evaluate_features(qf, gf, q_pids, g_pids, q_cams, g_cams, q_vis=q_vis, g_vis=g_vis)
    cmc = res["cmc"]
    metrics = {"mAP": res["mAP"], "R1": float(cmc[0]), "R5": float(cmc[min(4, len(cmc) - 1)]),
               "R10": float(cmc[min(9, len(cmc) - 1)]), "mINP": res["mINP"],
               "num_valid_queries": res["num_valid_queries"]}
    return {**metrics, "cmc": [float(c) for c in cmc]}, distmat


def evaluate(model, data: ReIDData, pairs, cfg, device, size, out_dir: Path | None = None, amp_dtype=None,
             num_workers: int = 1, rerank: bool = True) -> dict[str, dict]:
    """{label: metrics} for each (label, query split, gallery split) in `pairs` present in `data`, and with
    `cfg.test.rerank` (and `rerank`) the k-reciprocal re-ranked metrics too, as `<label>_rerank`: the plain
    figures are always reported, re-ranking is a post-process on top (the validation hook passes rerank=False:
    checkpoints are chosen by the plain mAP).

    Every rank must call it; the metrics are on rank 0 (other ranks get {}). With `out_dir`, rank 0 also
    writes ranked lists (`ranked_<label>.png`) and the CMC curves (`cmc.png`).
    """
    splits = data.splits()
    present = [(label, q, g) for label, q, g in pairs if q in splits and g in splits]
    global_only = cfg.test.distance == "global"
    cache: dict[str, dict] = {}
    for name in dict.fromkeys(s for _, q, g in present for s in (q, g)):
        cache[name] = extract(model, splits[name], device, size, cfg.data.test_batch_size, num_workers,
                              cfg.test.flip, global_only, amp_dtype)
    if not du.is_main():
        return {}
    modes = [("", False)] + ([("_rerank", True)] if rerank and cfg.test.rerank else [])
    results = {}
    for (label, q, g), (suffix, rr) in itertools.product(present, modes):
        qf, gf = cache[q], cache[g]
        metrics, distmat = split_metrics(qf["features"], gf["features"], qf["visibility"], gf["visibility"],
                                         splits[q], splits[g], cfg.test, cfg.test.distance, rerank=rr)
        results[label + suffix] = metrics
        if out_dir is not None and cfg.test.num_ranked > 0:
            _ranked_picture(qf, gf, distmat, splits[q], splits[g], cfg.test, out_dir / f"ranked_{label}{suffix}.png")
    if out_dir is not None and results:
        plot_cmc({k: np.asarray(v["cmc"]) for k, v in results.items()}, out_dir / "cmc.png")
    return results


def _ranked_picture(qf: dict, gf: dict, distmat, query, gallery, cfg_test, path: Path) -> None:
    """Ranked lists of the first queries (a bounded slice of the distance matrix, whatever the dataset size)."""
    n = min(len(query), max(8 * cfg_test.num_ranked, 64))
    if distmat is not None:
        dist = torch.as_tensor(np.asarray(distmat)[:n])
    elif cfg_test.distance == "global":
        f = qf["features"] if qf["features"].dim() == 2 else qf["features"][:, 0]
        g = gf["features"] if gf["features"].dim() == 2 else gf["features"][:, 0]
        dist = pairwise_distance(f[:n], g)
    else:
        dist = pairwise_distance(qf["features"][:n], gf["features"], q_vis=qf["visibility"][:n], g_vis=gf["visibility"])
    try:
        ranked_lists(dist.cpu(), list(query)[:n], list(gallery), path, num_queries=cfg_test.num_ranked)
    except ValueError as exc:
        logger.warning("no ranked-list picture %s: %s", path.name, exc)


def format_table(results: dict[str, dict], title: str = "") -> str:
    """The results as a text table in percent: split | mAP | R1 | R5 | R10 | mINP."""
    head = f"{'split':<20}| {'mAP':>6} | {'R1':>6} | {'R5':>6} | {'R10':>6} | {'mINP':>6}"
    lines = ([title] if title else []) + [head, "-" * len(head)]
    for label, m in results.items():
        lines.append(f"{label:<20}| " + " | ".join(f"{100 * m[k]:6.2f}" for k in ("mAP", "R1", "R5", "R10", "mINP")))
    return "\n".join(lines)
