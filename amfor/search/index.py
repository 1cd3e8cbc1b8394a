"""`GalleryIndex`: gallery features in a faiss index, searched by cosine similarity, saved with their paths.

Features are L2-normalised on the way in (gallery and queries), so the inner product the index computes is the cosine
similarity (and ranks like the squared Euclidean distance evaluation uses: 2 - 2 cos). Kinds:

- "flat": exact (`IndexFlatIP`, a scan of every gallery vector; BLAS for query batches). A long list (k > 1024, up
  to the whole gallery, as evaluation asks) is a matrix product and a sort instead, ties in gallery order.
- "ivf": inverted lists (`IndexIVFFlat`): `nlist` k-means cells (default about 4 sqrt(N), at most N / 39) trained
  on a sample of `train_size` vectors (default 64 per cell), `nprobe` cells scanned per query (default 16).
- "hnsw": a navigable small-world graph (`IndexHNSWFlat`): `M` links per vector (default 32), `ef_construction`
  (default 80) at build and `ef_search` (default 64; raised to k when smaller) at query time. Approximate.

The gallery is normalised and added a chunk (about 256 MB) at a time, so building never copies it whole.
A saved index is a folder, written to a temporary name and renamed (never half-written):
    index.faiss       the faiss index
    index.json        kind, parameters, dimension, size, the gallery's paths and metadata
    parts.npy         optional [N, 1+P, D] float32 part features (memory-mapped when loaded: the re-scoring of a
    visibility.npy    shortlist reads only its rows), with their visibility [N, 1+P]
    camids.npy        optional [N] int64 camera ids
faiss is an optional extra: `pip install "amfor[search]"`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from amfor.deploy.feature_file import FeatureSet
from amfor.extras import require

KINDS = ("flat", "ivf", "hnsw")
FORMAT = "amfor.search.GalleryIndex/1"
BUILD_PARAMS = {"flat": (), "ivf": ("nlist", "nprobe", "train_size", "seed"),
                "hnsw": ("M", "ef_construction", "ef_search")}
MIN_PER_CELL = 39  # faiss's k-means wants 39 training vectors a centroid (and warns on stderr below that)
LONG_LIST = 1024  # a flat index answers k above this with a sort (see _flat_long_lists)
SEARCH_PARAMS = {"flat": (), "ivf": ("nprobe",), "hnsw": ("ef_search",)}


class SearchError(ValueError):
    """An index that cannot be built, searched, saved or loaded as asked; the message names the problem (and path)."""


def faiss_module():
    """The faiss module; a MissingExtraError with the install line when it is not installed."""
    require("faiss", extra="search", purpose="amfor.search (the gallery index)")
    import faiss

    return faiss


def as_array(x, name: str) -> np.ndarray:
    """`x` ([N, D] tensor or array) as a float32 numpy array [N, D], a view where it already is one."""
    a = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    if a.ndim != 2 or a.shape[1] == 0:
        raise SearchError(f"{name} must be [N, D] features, got shape {list(a.shape)}")
    return a


def as_matrix(x, name: str, dim: int | None = None) -> np.ndarray:
    """`x` ([N, D] tensor or array) as a C-contiguous float32 numpy array, rows L2-normalised (a copy)."""
    a = as_array(x, name)
    if dim is not None and a.shape[1] != dim:
        raise SearchError(f"{name} have dimension {a.shape[1]}, the index has {dim}")
    a = np.array(a, dtype=np.float32, order="C", copy=True)
    sq = np.einsum("ij,ij->i", a, a)  # no [N, D] temporary
    if not np.isfinite(sq).all():
        raise SearchError(f"{name} contain NaN or inf")
    a /= np.maximum(np.sqrt(sq), 1e-12)[:, None]
    return a


def default_params(kind: str, n: int) -> dict:
    """The build and search parameters of `kind` for a gallery of n vectors (see the module docstring)."""
    if kind == "ivf":
        nlist = max(1, min(round(4 * math.sqrt(n)), n // MIN_PER_CELL))
        return {"nlist": nlist, "nprobe": min(16, nlist), "train_size": min(n, 64 * nlist), "seed": 0}
    if kind == "hnsw":
        return {"M": 32, "ef_construction": 80, "ef_search": 64}
    return {}


class GalleryIndex:
    """A faiss index over N gallery features [N, D] with their paths (and optional parts, visibility, camids).

    Build with `GalleryIndex.build(features, paths, kind, **params)` or `from_features(FeatureSet, ...)`, query with
    `search(queries, k)`, keep with `save(folder)` / `GalleryIndex.load(folder)`.
    """

    def __init__(self, index, kind: str, params: dict, paths: list[str], parts=None, visibility=None, camids=None,
                 metadata: dict | None = None):
        self.index, self.kind, self.params = index, kind, dict(params)
        self.paths = list(paths)
        self.parts, self.visibility, self.camids = parts, visibility, camids
        self.metadata = dict(metadata or {})

    # ----------------------------------------------------------------------------------------------------- build
    @classmethod
    def build(cls, features, paths: list[str] | None = None, kind: str = "flat", *, parts=None, visibility=None,
              camids=None, metadata: dict | None = None, **params) -> GalleryIndex:
        """Index `features` [N, D] (normalised here); paths default to the row numbers.

        params by kind: ivf `nlist`, `nprobe`, `train_size`, `seed`; hnsw `M`, `ef_construction`, `ef_search`.
        parts [N, 1+P, D] with visibility [N, 1+P] and camids [N] are kept for re-scoring and evaluation.
        """
        if kind not in KINDS:
            raise SearchError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        unknown = sorted(set(params) - set(BUILD_PARAMS[kind]))
        if unknown:
            raise SearchError(f"unknown parameter(s) {', '.join(unknown)} for a {kind} index (it takes "
                              f"{', '.join(BUILD_PARAMS[kind]) or 'none'})")
        x = as_array(features, "gallery features")  # normalised chunk by chunk as it is added: no full copy
        n, d = x.shape
        if n == 0:
            raise SearchError("no gallery features: an index needs at least one")
        paths = [str(i) for i in range(n)] if paths is None else [str(p) for p in paths]
        if len(paths) != n:
            raise SearchError(f"{len(paths)} paths for {n} gallery features")
        extras = _check_extras(n, parts, visibility, camids)
        params = {**default_params(kind, n), **params}
        index = _make_index(faiss_module(), kind, d, x, params)
        return cls(index, kind, params, paths, *extras, metadata=metadata)

    @classmethod
    def from_features(cls, features: FeatureSet, kind: str = "flat", **params) -> GalleryIndex:
        """Index a features file's contents (amfor.deploy.feature_file.FeatureSet), parts and camids included."""
        return cls.build(features.features, features.paths, kind, parts=features.parts,
                         visibility=features.visibility, camids=features.camids, metadata=features.metadata,
                         **params)

    # ---------------------------------------------------------------------------------------------------- query
    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def search(self, queries, k: int, **params) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [Q, D] -> (similarities [Q, k] float32, cosine, descending; indices [Q, k] int64).

        params override the search parameters of this call (ivf `nprobe`, hnsw `ef_search`). An approximate index
        may find fewer than k: the rest are index -1 with similarity -inf.
        """
        if not 1 <= k <= len(self):
            raise SearchError(f"k = {k} must be between 1 and the gallery size {len(self)}")
        unknown = sorted(set(params) - set(SEARCH_PARAMS[self.kind]))
        if unknown:
            raise SearchError(f"unknown search parameter(s) {', '.join(unknown)} for a {self.kind} index")
        q = as_matrix(queries, "query features", self.dim)
        faiss = faiss_module()
        if self.kind == "flat" and k > LONG_LIST:
            return _flat_long_lists(faiss, self.index, q, k)
        p = {**self.params, **params}
        if self.kind == "ivf":
            options = faiss.SearchParametersIVF(nprobe=int(p["nprobe"]))
        elif self.kind == "hnsw":
            options = faiss.SearchParametersHNSW(efSearch=max(int(p["ef_search"]), k))
        else:
            options = None
        scores, idx = self.index.search(q, k, params=options)
        scores = np.where(idx < 0, -np.inf, scores).astype(np.float32)
        return torch.from_numpy(scores), torch.from_numpy(idx.astype(np.int64))

    def features(self, rows) -> torch.Tensor:
        """The stored (normalised) global features of gallery rows [R] -> [R, D] float32."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise SearchError(f"gallery rows must lie in [0, {len(self)}), got {rows.min()}..{rows.max()}")
        return torch.from_numpy(self.index.reconstruct_batch(rows).reshape(rows.size, self.dim))

    def part_features(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """Parts [R, 1+P, D] and visibility [R, 1+P] of gallery rows [R] (an SearchError when none are stored)."""
        if self.parts is None:
            raise SearchError("the index holds no part features (build it from a features file with parts)")
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        return (torch.from_numpy(np.ascontiguousarray(self.parts[rows], dtype=np.float32)),
                torch.from_numpy(np.ascontiguousarray(self.visibility[rows], dtype=np.float32)))

    @property
    def nbytes(self) -> int:
        """Bytes the faiss index holds in memory: vectors, inverted lists or graph links, ids, centroids."""
        return index_nbytes(faiss_module(), self.index)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"GalleryIndex(kind={self.kind!r}, size={len(self)}, dim={self.dim}{', ' if params else ''}{params})"

    # ------------------------------------------------------------------------------------------------ save, load
    def save(self, path: str | Path) -> Path:
        """Write the index folder (see the module docstring) through a temporary folder; returns the path."""
        path = Path(path)
        if path.exists() and not (path / "index.json").is_file():
            raise SearchError(f"{path}: exists and is not a saved index; not overwritten")
        faiss = faiss_module()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        old = path.with_name(f".{path.name}.{os.getpid()}.old")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            faiss.write_index(self.index, str(tmp / "index.faiss"))
            for name in ("parts", "visibility", "camids"):
                value = getattr(self, name)
                if value is not None:
                    np.save(tmp / f"{name}.npy", np.asarray(value))
            info = {"format": FORMAT, "kind": self.kind, "params": self.params, "dim": self.dim, "size": len(self),
                    "paths": self.paths, "metadata": self.metadata}
            (tmp / "index.json").write_text(json.dumps(info))
            if path.exists():
                path.rename(old)
            tmp.rename(path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: str | Path, mmap: bool = True) -> GalleryIndex:
        """Read an index folder written by `save`; parts are memory-mapped unless `mmap=False`."""
        path = Path(path)
        if not path.is_dir():
            raise SearchError(f"{path}: no such index folder")
        try:
            info = json.loads((path / "index.json").read_text())
            if info.get("format") != FORMAT:
                raise SearchError(f"{path}: not a saved gallery index (format {info.get('format')!r})")
            index = faiss_module().read_index(str(path / "index.faiss"))
            arrays = {name: np.load(path / f"{name}.npy", mmap_mode="c" if mmap and name != "camids" else None)
                      for name in ("parts", "visibility", "camids") if (path / f"{name}.npy").is_file()}
        except SearchError:
            raise
        except Exception as exc:  # json, faiss and numpy each raise their own kinds for a damaged folder
            raise SearchError(f"{path}: not a readable gallery index ({type(exc).__name__}: {exc})") from exc
        if index.ntotal != info["size"] or len(info["paths"]) != info["size"] or index.d != info["dim"]:
            raise SearchError(f"{path}: index.faiss holds {index.ntotal} x {index.d}, index.json says "
                              f"{info['size']} x {info['dim']} with {len(info['paths'])} paths")
        extras = _check_extras(info["size"], arrays.get("parts"), arrays.get("visibility"), arrays.get("camids"))
        return cls(index, info["kind"], info["params"], info["paths"], *extras, metadata=info["metadata"])


def _flat_long_lists(faiss, index, q: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k of a flat index for a long k: a matrix product and a sort per query chunk, ties broken by gallery row
    as evaluation breaks them (faiss's heap selection, O(G log k) a query, is slow for whole-gallery lists)."""
    n, d = index.ntotal, index.d
    gallery = faiss.rev_swig_ptr(index.get_xb(), n * d).reshape(n, d)  # a view of the stored vectors, no copy
    chunk = max(1, (1 << 23) // n)
    scores, rows = np.empty((q.shape[0], k), np.float32), np.empty((q.shape[0], k), np.int64)
    for s in range(0, q.shape[0], chunk):
        scores[s:s + chunk], rows[s:s + chunk] = sort_descending(q[s:s + chunk] @ gallery.T, k)
    return torch.from_numpy(scores), torch.from_numpy(rows)


def sort_descending(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """[R, C] float32 -> the k largest values of each row [R, k] and their columns [R, k] int64, descending, equal
    values by column (what a stable sort gives). One sort of int64 keys (the order-preserving bits of -x, then the
    column) instead of a stable argsort: several times faster."""
    bits = (np.float32(0.0) - x).view(np.int32)  # 0 - x: -x, and +0.0 for both zeros
    bits ^= (bits >> 31) & 0x7FFFFFFF  # negative floats order backwards as ints: flip all but the sign
    keys = (bits.astype(np.int64) << 32) | np.arange(x.shape[1], dtype=np.int64)
    keys.sort(axis=1)
    keys = keys[:, :k]
    high = (keys >> 32).astype(np.int32)
    high ^= (high >> 31) & 0x7FFFFFFF
    return -high.view(np.float32), keys & 0xFFFFFFFF


def _make_index(faiss, kind: str, d: int, x: np.ndarray, params: dict):
    """The faiss index of `kind` over the rows of x [N, d], trained and filled with them normalised, a chunk of
    about 256 MB at a time (a 1M x 768 gallery is never copied whole)."""
    ip, n = faiss.METRIC_INNER_PRODUCT, x.shape[0]
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, int(params["M"]), ip)
        index.hnsw.efConstruction = int(params["ef_construction"])
        index.hnsw.efSearch = int(params["ef_search"])
    else:
        nlist = int(params["nlist"])
        if not 1 <= nlist <= n:
            raise SearchError(f"nlist = {nlist} must be between 1 and the gallery size {n}")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, ip)  # spherical k-means for IP
        index.nprobe = int(params["nprobe"])
        index.cp.seed = int(params["seed"])
        train = min(n, max(int(params["train_size"]), nlist))
        sample = np.sort(np.random.default_rng(int(params["seed"])).choice(n, train, replace=False))
        index.train(as_matrix(x[sample] if train < n else x, "gallery features"))
    rows = max(1, (1 << 26) // d)
    for s in range(0, n, rows):
        index.add(as_matrix(x[s:s + rows], "gallery features"))
    if kind == "ivf":
        index.make_direct_map()  # reconstruct(): the global features of a shortlist, for re-ranking
    return index


def _check_extras(n: int, parts, visibility, camids) -> tuple:
    """parts [n, 1+P, D] float32 and visibility [n, 1+P] (both or neither), camids [n] int64, as numpy."""
    def arr(x, dtype):
        if x is None:
            return None
        if isinstance(x, torch.Tensor):
            return x.detach().cpu().numpy().astype(dtype, copy=False)
        return x if isinstance(x, np.memmap) and x.dtype == dtype else np.asarray(x, dtype=dtype)

    parts, visibility, camids = arr(parts, np.float32), arr(visibility, np.float32), arr(camids, np.int64)
    if (parts is None) != (visibility is None):
        raise SearchError("parts and visibility go together: give both or neither")
    if parts is not None and (parts.ndim != 3 or parts.shape[0] != n or visibility.shape != parts.shape[:2]):
        raise SearchError(f"parts must be [N, 1+P, D] and visibility [N, 1+P] with N = {n}, got "
                          f"{list(parts.shape)} and {list(visibility.shape)}")
    if camids is not None and camids.shape != (n,):
        raise SearchError(f"camids must be [N] with N = {n}, got {list(camids.shape)}")
    return parts, visibility, camids


def index_nbytes(faiss, index) -> int:
    """Bytes held by a flat, IVF-flat or HNSW-flat index (its vectors, lists, ids, links and centroids)."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexHNSW):
        h = index.hnsw
        links = h.neighbors.size() * 4 + h.levels.size() * 4 + h.offsets.size() * 8
        return int(links + index_nbytes(faiss, index.storage))
    if isinstance(index, faiss.IndexIVF):
        lists = faiss.extract_index_ivf(index).invlists
        stored = sum(lists.list_size(i) for i in range(lists.nlist)) * (index.code_size + 8)
        direct = index.ntotal * 8 if index.direct_map.type != faiss.DirectMap.NoMap else 0
        return int(stored + direct + index_nbytes(faiss, index.quantizer))
    return int(index.ntotal * index.code_size)
