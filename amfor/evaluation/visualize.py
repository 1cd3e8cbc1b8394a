"""Pictures of results: ranked lists with green/red borders, and CMC curves.

Drawn on `matplotlib.figure.Figure` objects (rendered by Agg when saved), never through pyplot: importing
amfor.evaluation leaves the caller's matplotlib backend and pyplot state alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ._inputs import check_matrix
from .rank import evaluate_rank

GREEN, RED, GREY = (0, 170, 0), (220, 0, 0), (90, 90, 90)


def _tile(path: str, size: tuple[int, int], color: tuple[int, int, int], border: int = 4) -> np.ndarray:
    """Image at `path` resized to `size` (H, W) with a coloured border, as uint8 [H + 2b, W + 2b, 3]."""
    img = Image.open(path).convert("RGB").resize((size[1], size[0]))
    return np.asarray(ImageOps.expand(img, border=border, fill=color))


def ranked_lists(distmat, query: Sequence, gallery: Sequence, out_path: str | Path, topk: int = 10,
                 num_queries: int = 8, worst_first: bool = False, image_size: tuple[int, int] = (128, 64)) -> Path:
    """Save a PNG: one row per query (grey border), then its top-k gallery images, green = same pid, red = not.

    query/gallery: records with .path, .pid, .camid. Same-pid same-camera gallery entries are left out as
    in the protocol. `worst_first`: show the queries with the lowest AP first (else the first queries).
    """
    dist = check_matrix(distmat, "distmat").cpu().numpy()
    if dist.shape != (len(query), len(gallery)):
        raise ValueError(f"distmat is {dist.shape} but there are {len(query)} queries and {len(gallery)} gallery items")
    q_ids = [_ids(query)[k] for k in range(2)]
    g_ids = [_ids(gallery)[k] for k in range(2)]
    res = evaluate_rank(dist, q_ids[0], g_ids[0], q_ids[1], g_ids[1], max_rank=1, return_per_query=True)
    valid = np.nonzero(res["valid"])[0]
    chosen = valid[np.argsort(res["AP"][valid], kind="stable")] if worst_first else valid
    rows = [_row(dist[i], query[i], gallery, g_ids, topk, image_size) for i in chosen[:num_queries]]
    return _save_grid(rows, out_path, [f"AP {res['AP'][i]:.2f}" for i in chosen[:num_queries]])


def _ids(records: Sequence) -> tuple[np.ndarray, np.ndarray]:
    return np.array([r.pid for r in records]), np.array([r.camid for r in records])


def _row(dist_row: np.ndarray, q, gallery: Sequence, g_ids, topk: int, size: tuple[int, int]) -> np.ndarray:
    order = np.argsort(dist_row, kind="stable")
    keep = ~((g_ids[0][order] == q.pid) & (g_ids[1][order] == q.camid))
    tiles = [_tile(q.path, size, GREY), np.full((size[0] + 8, 12, 3), 255, np.uint8)]
    for j in order[keep][:topk]:
        tiles.append(_tile(gallery[j].path, size, GREEN if gallery[j].pid == q.pid else RED))
    width = 2 + (size[1] + 8) * (topk + 1) + 12
    row = np.concatenate(tiles, 1)
    return np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0)), constant_values=255)


def _save_grid(rows: list[np.ndarray], out_path: str | Path, labels: list[str]) -> Path:
    if not rows:
        raise ValueError("no valid query to draw")
    grid = np.concatenate(rows, 0)
    dpi = 100
    from matplotlib.figure import Figure  # here: amfor.evaluation imports without matplotlib (issue 25)

    fig = Figure(figsize=(grid.shape[1] / dpi, grid.shape[0] / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(grid)
    ax.set_axis_off()
    for k, text in enumerate(labels):
        ax.text(2, k * rows[0].shape[0] + 12, text, color="yellow", fontsize=7, backgroundcolor="black")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out


def plot_cmc(cmcs: Mapping[str, np.ndarray] | np.ndarray, out_path: str | Path, max_rank: int | None = None,
             title: str = "CMC") -> Path:
    """Save CMC curve(s) as PNG; `cmcs` is one curve [R] or {label: curve}. Rank axis starts at 1."""
    curves = {"CMC": np.asarray(cmcs)} if not isinstance(cmcs, Mapping) else {k: np.asarray(v) for k, v in cmcs.items()}
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4), dpi=100)
    ax = fig.add_subplot()
    for label, cmc in curves.items():
        if cmc.ndim != 1 or len(cmc) == 0:
            raise ValueError(f"CMC curve {label!r} must be a non-empty 1-D array")
        cmc = cmc[:max_rank] if max_rank else cmc
        ax.plot(np.arange(1, len(cmc) + 1), cmc, marker=".", label=f"{label} (R1 {cmc[0]:.3f})")
    ax.set(xlabel="rank", ylabel="matching rate", title=title, ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
