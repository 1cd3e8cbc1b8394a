"""`python -m amfor.search`: build a gallery index from a features file, query it with another.

    python -m amfor.search build --features gallery.safetensors --output gallery.index [--kind flat|ivf|hnsw]
                                 [--nlist N] [--nprobe N] [--M M] [--ef-construction N] [--ef-search N]
    python -m amfor.search query --index gallery.index --features query.safetensors [--k 10] [--shortlist N]
                                 [--rescore parts] [--rerank] [--nprobe N] [--ef-search N] [--output results.json]

Features files are those of amfor.deploy.feature_file (.safetensors or .npz, written by `amfor.extract`). The index
is a folder (amfor.search.index). `query` takes each query's top --shortlist (default max(k, 100) when re-scoring or
re-ranking, else k) from the index, re-scores it with the part distance (`--rescore parts`: both files need part
features) and/or re-ranks it (`--rerank`, k-reciprocal over the shortlists), and keeps the top k. The results (JSON)
go to --output, written whole or not at all, or to stdout. Errors a user can fix: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from amfor.deploy.feature_file import FeatureFileError, load_features
from amfor.extras import MissingExtraError

from .index import KINDS, GalleryIndex, SearchError
from .rescore import rerank_shortlist, rescore_parts

PROG = "python -m amfor.search"
USER_ERRORS = (FeatureFileError, SearchError, MissingExtraError, OSError)
SCORES = {"index": "cosine similarity (higher is closer)", "parts": "part distance (lower is closer)",
          "rerank": "re-ranked distance (lower is closer)"}


def build(args: argparse.Namespace) -> int:
    feats = load_features(args.features)
    params = {k: v for k, v in (("nlist", args.nlist), ("nprobe", args.nprobe), ("M", args.M),
                                ("ef_construction", args.ef_construction), ("ef_search", args.ef_search))
              if v is not None}
    index = GalleryIndex.from_features(feats, args.kind, **params)
    index.save(args.output)
    print(f"wrote {args.output}: {index!r}, {index.nbytes / 2**20:.1f} MiB")
    return 0


def search(index: GalleryIndex, feats, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Top k of each query after the optional re-scoring and re-ranking: (scores [Q, k], rows [Q, k], score kind)."""
    second = args.rescore is not None or args.rerank
    shortlist = args.shortlist or (max(args.k, 100) if second else args.k)
    if shortlist < args.k:
        raise SearchError(f"--shortlist {shortlist} is shorter than --k {args.k}")
    params = {k: v for k, v in (("nprobe", args.nprobe), ("ef_search", args.ef_search)) if v is not None}
    if args.k > len(index):
        raise SearchError(f"--k {args.k} exceeds the gallery size {len(index)} of {args.index}")
    scores, rows = index.search(feats.features, min(shortlist, len(index)), **params)
    kind = "index"
    if args.rescore == "parts":
        if feats.parts is None:
            raise SearchError(f"--rescore parts needs part features in {args.features} (it has none)")
        if index.parts is None:
            raise SearchError(f"--rescore parts needs part features in the index {args.index} (it has none)")
        scores, rows = rescore_parts(feats.parts, rows, index, feats.visibility)
        kind = "parts"
    if args.rerank:
        q_parts = feats.parts if args.rescore == "parts" else None
        scores, rows = rerank_shortlist(feats.features, rows, index, q_parts=q_parts, q_vis=feats.visibility)
        kind = "rerank"
    return scores[:, :args.k], rows[:, :args.k], kind


def query(args: argparse.Namespace) -> int:
    index = GalleryIndex.load(args.index)
    feats = load_features(args.features)
    if feats.features.shape[1] != index.dim:
        raise SearchError(f"{args.features} holds {feats.features.shape[1]}-d features, the index {args.index} "
                          f"{index.dim}-d")
    scores, rows, kind = search(index, feats, args)
    results = []
    for path, score, row in zip(feats.paths, scores.tolist(), rows.tolist(), strict=True):
        hits = [{"rank": r + 1, "path": index.paths[i], "row": i, "score": s}
                for r, (s, i) in enumerate((s, i) for s, i in zip(score, row, strict=True) if i >= 0)]
        results.append({"query": path, "results": hits})
    out = {"index": str(args.index), "features": str(args.features), "kind": index.kind, "k": args.k,
           "rescore": args.rescore, "rerank": args.rerank, "score": SCORES[kind], "queries": results}
    text = json.dumps(out, indent=1)
    if args.output is None:
        print(text)
        return 0
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {output}: {len(results)} queries, top {args.k} each ({SCORES[kind]})")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="index a gallery's features file")
    b.add_argument("--features", required=True, help="the gallery's features file (.safetensors or .npz)")
    b.add_argument("--output", required=True, help="the index folder to write")
    b.add_argument("--kind", choices=KINDS, default="flat", help="flat (exact), ivf or hnsw (approximate)")
    b.add_argument("--nlist", type=int, help="ivf: k-means cells (default about 4 sqrt(N))")
    b.add_argument("--M", type=int, help="hnsw: links per vector (default 32)")
    b.add_argument("--ef-construction", type=int, help="hnsw: candidates while building (default 80)")
    q = sub.add_parser("query", help="search an index with a features file of queries")
    q.add_argument("--index", required=True, help="an index folder written by `build`")
    q.add_argument("--features", required=True, help="the queries' features file")
    q.add_argument("--k", type=int, default=10, help="results per query (default 10)")
    q.add_argument("--shortlist", type=int, help="candidates per query taken from the index before re-scoring")
    q.add_argument("--rescore", choices=("parts",), help="re-score the shortlist with the part distance")
    q.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking over the shortlists")
    q.add_argument("--output", help="write the results here (JSON); default: stdout")
    for s in (b, q):
        s.add_argument("--nprobe", type=int, help="ivf: cells scanned per query (default 16)")
        s.add_argument("--ef-search", type=int, help="hnsw: candidates per query (default 64)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return build(args) if args.command == "build" else query(args)
    except USER_ERRORS as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
