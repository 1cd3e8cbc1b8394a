"""Pictures of results: ranked lists with green/red borders, ranked lists next to the query's part maps and
predicted visibility (`ranked_with_parts`, drawn by `python -m amfor.visualize`), and CMC curves.

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

GREEN, RED, GREY, BLUE = (0, 170, 0), (220, 0, 0), (90, 90, 90), (40, 90, 200)
BORDER, GAP = 4, 12  # a tile's coloured border; the white gap between a query and its ranked list
STRIP, LEGEND = 14, 18  # width of the visibility strip; height of the parts' legend above the rows
# one colour per body part (matplotlib's tab10, without its grey), in the order of amfor.schema.PART_NAMES[1:]
PART_COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (188, 189, 34), (23, 190, 207))


def _tile(path: str, size: tuple[int, int], color: tuple[int, int, int], border: int = BORDER) -> np.ndarray:
    """Image at `path` resized to `size` (H, W) with a coloured border, as uint8 [H + 2b, W + 2b, 3]."""
    img = Image.open(path).convert("RGB").resize((size[1], size[0]))
    return np.asarray(ImageOps.expand(img, border=border, fill=color))


def part_overlay(path: str, maps: np.ndarray, size: tuple[int, int], alpha: float = 0.75) -> np.ndarray:
    """The image at `path` resized to `size` (H, W) with the part maps [P, h, w] (probabilities on the patch grid)
    laid over it: each pixel in the colour of its most probable part, as opaque as the parts' share of it relative to
    the image's most confident pixel (so a short-trained model's diffuse maps still show where it puts each part; the
    background stays clear). -> uint8 [H + 2b, W + 2b, 3] with a grey border."""
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3 or maps.shape[0] > len(PART_COLORS):
        raise ValueError(f"part maps must be [P, h, w] with P <= {len(PART_COLORS)}, got {maps.shape}")
    resample = Image.Resampling.BILINEAR
    up = np.stack([np.asarray(Image.fromarray(m).resize((size[1], size[0]), resample)) for m in maps]).clip(0, 1)
    share = up.sum(0).clip(0, 1)
    share = (share / max(float(share.max()), 1e-6))[..., None]  # [H, W, 1] in [0, 1]
    color = np.asarray(PART_COLORS, np.float32)[up.argmax(0)]  # [H, W, 3]
    img = np.asarray(Image.open(path).convert("RGB").resize((size[1], size[0])), dtype=np.float32)
    blend = img * (1 - alpha * share) + color * alpha * share
    return np.asarray(ImageOps.expand(Image.fromarray(blend.round().astype(np.uint8)), border=BORDER, fill=GREY))


def visibility_strip(visible: np.ndarray, height: int) -> np.ndarray:
    """A column of P cells, part p in its colour when predicted visible, white with a coloured frame when not.
    visible: [P] in [0, 1] (> 0.5 is visible) -> uint8 [height, STRIP, 3]."""
    strip = np.full((height, STRIP, 3), 255, np.uint8)
    edges = np.linspace(BORDER, height - BORDER, len(visible) + 1).round().astype(int)
    for p, v in enumerate(np.asarray(visible, dtype=np.float32)):
        top, bottom, color = edges[p], edges[p + 1], np.asarray(PART_COLORS[p], np.uint8)
        strip[top:bottom - 1, 2:] = color
        if v <= 0.5:
            strip[top + 2:bottom - 3, 4:-2] = 255
    return strip


def ranked_with_parts(distmat, query: Sequence[str], gallery: Sequence[str], part_maps, visibility,
                      out_path: str | Path, topk: int = 8, image_size: tuple[int, int] = (128, 64),
                      part_names: Sequence[str] | None = None, labels: Sequence[str] | None = None,
                      ids: tuple[Sequence[tuple[int, int]], Sequence[tuple[int, int]]] | None = None) -> Path:
    """Save a PNG: the parts' legend, then one row per query: the image, the image with its part maps overlaid
    (`part_overlay`), its predicted visibility (`visibility_strip`, parts top to bottom in the legend's order),
    then its top-k gallery images by `distmat`, each with its distance: blue borders, or with `ids` ((pid, camid) of
    every query and gallery image) green for the query's identity and red for another, the same identity seen by
    the same camera left out as in the protocol.

    distmat [Q, G]; query / gallery: image paths; part_maps [Q, P, h, w]; visibility [Q, P] in [0, 1].
    Size: width (topk + 2) (W + 2 BORDER) + STRIP + GAP, height LEGEND + Q (H + 2 BORDER), for (H, W) = image_size.
    """
    dist = check_matrix(distmat, "distmat").cpu().numpy()
    maps, vis = np.asarray(part_maps, dtype=np.float32), np.asarray(visibility, dtype=np.float32)
    if dist.shape != (len(query), len(gallery)):
        raise ValueError(f"distmat is {dist.shape} but there are {len(query)} queries and {len(gallery)} gallery items")
    if not query or maps.shape[0] != len(query) or vis.shape != maps.shape[:2]:
        raise ValueError(f"need part maps [Q, P, h, w] and visibility [Q, P] for the {len(query)} queries, got "
                         f"{maps.shape} and {vis.shape}")
    h, w = image_size
    tile_h, tile_w = h + 2 * BORDER, w + 2 * BORDER
    width = (topk + 2) * tile_w + STRIP + GAP
    rows, texts = [], []
    for i, path in enumerate(query):
        order = np.argsort(dist[i], kind="stable")
        colors = {int(j): BLUE for j in order[:topk]}
        if ids is not None:
            q_id = ids[0][i]
            order = [j for j in order if tuple(ids[1][j]) != tuple(q_id)]
            colors = {int(j): GREEN if ids[1][j][0] == q_id[0] else RED for j in order[:topk]}
        order = list(order[:topk])
        tiles = [_tile(path, image_size, GREY), part_overlay(path, maps[i], image_size),
                 visibility_strip(vis[i], tile_h), np.full((tile_h, GAP, 3), 255, np.uint8)]
        tiles += [_tile(gallery[j], image_size, colors[int(j)]) for j in order]
        row = np.concatenate(tiles, 1)
        rows.append(np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0)), constant_values=255))
        x0, y0 = 2 * tile_w + STRIP + GAP, LEGEND + i * tile_h + tile_h - 6
        texts += [(x0 + k * tile_w + 3, y0, f"{dist[i, j]:.2f}") for k, j in enumerate(order)]
    names = list(part_names) if part_names is not None else [f"part {p + 1}" for p in range(maps.shape[1])]
    legend = np.full((LEGEND, width, 3), 255, np.uint8)
    step = width // max(len(names), 1)
    for p in range(len(names)):
        legend[4:LEGEND - 4, p * step + 2:p * step + 12] = PART_COLORS[p]
    legend_texts = [(p * step + 14, LEGEND - 5, name) for p, name in enumerate(names)]
    row_labels = [None, *(labels if labels is not None else [Path(q).name for q in query])]
    return _save_grid([legend, *rows], out_path, row_labels, texts=[*legend_texts, *texts], text_size=6)


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


def _save_grid(rows: list[np.ndarray], out_path: str | Path, labels: list[str | None],
               texts: Sequence[tuple[int, int, str]] = (), text_size: float = 5) -> Path:
    """Save the rows stacked as a PNG of exactly their pixels; a label (yellow on black) at the top left of each row
    (None: none), and small black `texts` (x, y, text) in pixels from the top left."""
    if not rows:
        raise ValueError("no valid query to draw")
    grid = np.concatenate(rows, 0)
    tops = np.cumsum([0] + [r.shape[0] for r in rows[:-1]])
    dpi = 100
    from matplotlib.figure import Figure  # here: amfor.evaluation imports without matplotlib (issue 25)

    fig = Figure(figsize=(grid.shape[1] / dpi, grid.shape[0] / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(grid)
    ax.set_axis_off()
    for top, text in zip(tops, labels, strict=True):
        if text is not None:
            ax.text(2, top + 12, text, color="yellow", fontsize=7, backgroundcolor="black")
    for x, y, text in texts:
        ax.text(x, y, text, color="black", fontsize=text_size, backgroundcolor="white")
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
