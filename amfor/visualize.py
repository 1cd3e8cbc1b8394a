"""`python -m amfor.visualize --checkpoint PATH --query DIR|FILE... --gallery DIR|FILE...` (or `amfor-visualize`):
what a trained model sees, as a PNG.

For the first `--num` queries: the image, the image with the model's part maps laid over it (the parsing head's
per-token part probabilities, `AMFOR.part_maps`: one colour per body part, as opaque as the part's share of the
pixel), the predicted visibility of each part (a filled cell: visible; an empty frame: not), then the `--topk`
gallery images the model ranks first, with their distances (the checkpoint's `test.distance`, part or global,
unless `--distance` says otherwise; every camera unknown). When every file is named as Market-1501's
(`<pid>_c<camera>...`), the ranked images get green (same identity) or red borders and the query's identity seen by
its own camera is left out, as in the protocol; else blue borders. Folders are read recursively (.jpg, .jpeg, .png,
.bmp, .webp), in name order; images are resized and normalised as the model's `pretrained_cfg` says.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .cli import USER_ERRORS, prog_name, report
from .data.datasets.base import MARKET_PATTERN
from .deploy.extractor import Extractor, read_image
from .extract import IMAGE_SUFFIXES, is_image


class VisualizeError(ValueError):
    """A request the command cannot draw: no image found, a model without part maps, a bad option value."""


def image_paths(items: Sequence[str], what: str) -> list[Path]:
    """The images named by `items` (files, or folders searched recursively), folders' images in name order."""
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.rglob("*") if p.is_file() and is_image(p))
        elif path.is_file():
            paths.append(path)
        else:
            raise FileNotFoundError(f"{what} {path}: no such file or folder")
    if not paths:
        raise VisualizeError(f"no {what} image ({'/'.join(IMAGE_SUFFIXES)}) in {' '.join(items)}")
    return paths


def market_ids(paths: Sequence[Path]) -> list[tuple[int, int]] | None:
    """(pid, camid) of every file named as Market-1501's, or None when any is not."""
    found = [MARKET_PATTERN.match(p.name) for p in paths]
    if not all(found):
        return None
    return [(int(m.group(1)), int(m.group(2))) for m in found]


def load_images(paths: Sequence[Path], extractor) -> torch.Tensor:
    """[N, 3, H, W]: the images as the extractor reads them (the evaluation's test transform)."""
    images = []
    for path in paths:
        try:
            images.append(extractor.transform(read_image(path))[0])
        except OSError as exc:
            raise VisualizeError(str(exc)) from exc
    return torch.stack(images)


def features(extractor, paths: Sequence[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval features [N, 1+P, D] and visibility [N, 1+P] of the images, every camera unknown."""
    try:
        out = extractor([str(p) for p in paths], parts=True)
    except OSError as exc:
        raise VisualizeError(str(exc)) from exc
    return out.parts, out.visibility


def distances(qf: torch.Tensor, gf: torch.Tensor, q_vis: torch.Tensor, g_vis: torch.Tensor, kind: str) -> torch.Tensor:
    """[Q, G]: the evaluation's distances (`amfor.evaluation.pairwise_distance`), part or global."""
    from .evaluation import pairwise_distance

    if kind == "global":
        return pairwise_distance(qf[:, 0], gf[:, 0])
    return pairwise_distance(qf, gf, q_vis=q_vis, g_vis=g_vis)


def draw(checkpoint: str, query: Sequence[str], gallery: Sequence[str], output: Path, num: int, topk: int,
         distance: str | None, device: str) -> Path:
    from .deploy.load import load_for_inference
    from .evaluation.visualize import ranked_with_parts
    from .schema import PART_NAMES

    q_paths, g_paths = image_paths(query, "query")[:num], image_paths(gallery, "gallery")
    model, cfg, _ = load_for_inference(checkpoint, device=device)
    extractor = Extractor(model, device=device)
    if not callable(getattr(model, "part_maps", None)):
        raise VisualizeError(f"the model of {checkpoint} ({type(model).__name__}) has no part maps (part_maps)")
    try:
        maps = model.part_maps(load_images(q_paths, extractor).to(extractor.device))
    except ValueError as exc:  # a model built without its part branch
        raise VisualizeError(f"{checkpoint}: {exc}") from exc
    qf, q_vis = features(extractor, q_paths)
    gf, g_vis = features(extractor, g_paths)
    dist = distances(qf, gf, q_vis, g_vis, distance or cfg.test.distance)
    names = PART_NAMES[1:] if maps.shape[1] == len(PART_NAMES) - 1 else None
    q_ids, g_ids = market_ids(q_paths), market_ids(g_paths)
    return ranked_with_parts(dist.cpu(), [str(p) for p in q_paths], [str(p) for p in g_paths], maps.cpu(),
                             q_vis[:, 1:].cpu(), output, topk=topk, part_names=names,
                             ids=(q_ids, g_ids) if q_ids is not None and g_ids is not None else None)


def positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}")
    return int(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog_name("amfor.visualize"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by amfor.train")
    parser.add_argument("--query", required=True, nargs="+", metavar="DIR|FILE", help="query images or folders")
    parser.add_argument("--gallery", required=True, nargs="+", metavar="DIR|FILE", help="gallery images or folders")
    parser.add_argument("--num", type=positive, default=4, help="queries drawn (the first ones; default 4)")
    parser.add_argument("--topk", type=positive, default=8, help="gallery images per query (default 8)")
    parser.add_argument("--distance", choices=("part", "global"), help="default: the checkpoint's test.distance")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default="ranked_parts.png", help="the PNG to write (default ranked_parts.png)")
    args = parser.parse_args(argv)
    output = Path(args.output)
    try:
        if output.suffix.lower() != ".png":
            raise VisualizeError(f"--output must be a .png file, got {output}")
        draw(args.checkpoint, args.query, args.gallery, output, args.num, args.topk, args.distance, args.device)
    except BaseException as exc:
        if isinstance(exc, (*USER_ERRORS, VisualizeError)):
            return report(parser.prog, exc)
        raise
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
