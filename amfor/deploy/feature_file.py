"""The features file: what `amfor.extract` writes and `amfor.search` reads, as safetensors or npz.

Tensors, N images:
    features    float32 [N, D]       the global feature, L2-normalised
    parts       float32 [N, 1+P, D]  optional: the model's features (global then P parts), as evaluation uses them
    visibility  float32 [N, 1+P]     optional, with parts: the predicted visibility of each
    camids      int64   [N]          optional: camera ids, -1 for an unknown camera
Strings: `paths` (N image paths or names, in the order of the rows) and `metadata` (str -> str: the model's name,
the checkpoint, ...). In safetensors both live in the header's metadata (`paths` as a JSON list); in npz `paths` is a
string array and `metadata` a JSON string. A file is written to a temporary name and renamed: never half-written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

SUFFIXES = (".safetensors", ".npz")
TENSORS = ("features", "parts", "visibility", "camids")


class FeatureFileError(ValueError):
    """A features file that cannot be written or read as this module defines it; the message names the file."""


@dataclass
class FeatureSet:
    """Features of N images with their paths (see the module docstring for shapes)."""

    features: torch.Tensor
    paths: list[str]
    parts: torch.Tensor | None = None
    visibility: torch.Tensor | None = None
    camids: torch.Tensor | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.paths)
        if self.features.dim() != 2 or self.features.shape[0] != n:
            raise FeatureFileError(f"features must be [N, D] with N = {n} paths, got {list(self.features.shape)}")
        if (self.parts is None) != (self.visibility is None):
            raise FeatureFileError("parts and visibility go together: give both or neither")
        if self.parts is not None and (self.parts.dim() != 3 or self.parts.shape[0] != n
                                       or self.visibility.shape != self.parts.shape[:2]):
            raise FeatureFileError(f"parts must be [N, 1+P, D] and visibility [N, 1+P] with N = {n}, got "
                                   f"{list(self.parts.shape)} and {list(self.visibility.shape)}")
        if self.camids is not None and self.camids.shape != (n,):
            raise FeatureFileError(f"camids must be [N] with N = {n}, got {list(self.camids.shape)}")

    def __len__(self) -> int:
        return len(self.paths)


def _check_suffix(path: Path) -> None:
    if path.suffix not in SUFFIXES:
        suffix = path.suffix or "(none)"
        raise FeatureFileError(f"{path}: a features file ends in {' or '.join(SUFFIXES)}, not {suffix!r}")


def save_features(path: str | Path, features: FeatureSet) -> Path:
    """Write `features` to `path` (.safetensors or .npz) through a temporary file; returns the path."""
    path = Path(path)
    _check_suffix(path)
    tensors = {k: getattr(features, k) for k in TENSORS if getattr(features, k) is not None}
    tensors = {k: v.detach().cpu().contiguous().to(torch.int64 if k == "camids" else torch.float32)
               for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata={**features.metadata, "paths": json.dumps(features.paths)})
        else:
            arrays = {k: v.numpy() for k, v in tensors.items()}
            np.savez(tmp, paths=np.asarray(features.paths, dtype=str), metadata=json.dumps(features.metadata),
                     **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_features(path: str | Path) -> FeatureSet:
    """Read a features file written by `save_features`; a missing, foreign or malformed file is a FeatureFileError."""
    path = Path(path)
    _check_suffix(path)
    if not path.is_file():
        raise FeatureFileError(f"{path}: no such features file")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            paths = json.loads(metadata.pop("paths"))
        else:
            with np.load(path, allow_pickle=False) as f:
                tensors = {k: torch.from_numpy(f[k]) for k in TENSORS if k in f.files}
                paths = [str(p) for p in f["paths"]]
                metadata = json.loads(str(f["metadata"]))
    except FeatureFileError:
        raise
    except Exception as exc:  # a foreign or damaged file: safetensors, numpy and json each raise their own kinds
        raise FeatureFileError(f"{path}: not a features file ({type(exc).__name__}: {exc})") from exc
    if "features" not in tensors:
        raise FeatureFileError(f"{path}: no 'features' tensor (has {sorted(tensors)})")
    try:
        return FeatureSet(paths=paths, metadata=metadata, **{k: tensors.get(k) for k in TENSORS})
    except FeatureFileError as exc:
        raise FeatureFileError(f"{path}: {exc}") from None
