"""The features file round-trips in both formats and refuses what it is not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amfor.deploy.feature_file import FeatureFileError, FeatureSet, load_features, save_features


def _set(n: int = 5, parts: bool = True) -> FeatureSet:
    gen = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(n, 8, generator=gen), dim=1)
    return FeatureSet(features=feats, paths=[f"dir/{i}é.jpg" for i in range(n)],
                      parts=torch.randn(n, 3, 8, generator=gen) if parts else None,
                      visibility=torch.rand(n, 3, generator=gen) if parts else None,
                      camids=torch.tensor([0, -1, 2, 1, 0][:n]), metadata={"model": "amfor_vit_tiny_patch16"})


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
@pytest.mark.parametrize("parts", [True, False])
def test_a_features_file_round_trips(tmp_path, suffix, parts):
    want = _set(parts=parts)
    got = load_features(save_features(tmp_path / f"sub/feats{suffix}", want))
    assert got.paths == want.paths and got.metadata == want.metadata
    for key in ("features", "parts", "visibility", "camids"):
        a, b = getattr(want, key), getattr(got, key)
        assert (a is None and b is None) or torch.equal(a, b), key
    assert [p.name for p in (tmp_path / "sub").iterdir()] == [f"feats{suffix}"]  # no temporary file left


def test_bad_files_and_sets_are_named(tmp_path):
    with pytest.raises(FeatureFileError, match="feats.txt: a features file ends in"):
        save_features(tmp_path / "feats.txt", _set())
    with pytest.raises(FeatureFileError, match="missing.npz: no such features file"):
        load_features(tmp_path / "missing.npz")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FeatureFileError, match="junk.safetensors: not a features file"):
        load_features(tmp_path / "junk.safetensors")
    np.savez(tmp_path / "other.npz", x=np.zeros(3), paths=np.asarray(["a"]), metadata="{}")
    with pytest.raises(FeatureFileError, match="other.npz: no 'features' tensor"):
        load_features(tmp_path / "other.npz")
    with pytest.raises(FeatureFileError, match=r"features must be \[N, D\] with N = 2 paths"):
        FeatureSet(features=torch.zeros(3, 4), paths=["a", "b"])
    with pytest.raises(FeatureFileError, match="parts and visibility go together"):
        FeatureSet(features=torch.zeros(2, 4), paths=["a", "b"], parts=torch.zeros(2, 3, 4))
