"""`python -m amfor.search build|query` on features files: the results are the index's, re-scored and re-ranked on
request; bad input is one line naming the problem, exit code 2, nothing written."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from cli_runs import run_cli

from amfor.deploy.feature_file import FeatureSet, save_features
from amfor.evaluation import pairwise_distance
from amfor.search import GalleryIndex
from amfor.search.__main__ import main


def feature_set(n: int, seed: int, prefix: str, dim: int = 16, parts: bool = True) -> FeatureSet:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(20, 4, dim, generator=torch.Generator().manual_seed(99))
    p = centres[torch.randint(0, 20, (n,), generator=gen)] + 0.4 * torch.randn(n, 4, dim, generator=gen)
    return FeatureSet(features=torch.nn.functional.normalize(p[:, 0], dim=1), paths=[f"{prefix}/{i}.jpg" for i in
                      range(n)], parts=p if parts else None, visibility=torch.rand(n, 4, generator=gen) if parts
                      else None, camids=torch.arange(n) % 3)


@pytest.fixture
def files(tmp_path):
    gallery, queries = feature_set(300, 0, "gallery"), feature_set(7, 1, "query")
    return (save_features(tmp_path / "gallery.safetensors", gallery), save_features(tmp_path / "query.npz", queries),
            gallery, queries)


def test_build_then_query_gives_the_indexs_top_k(tmp_path, files, capsys):
    gallery_file, query_file, gallery, queries = files
    assert main(["build", "--features", str(gallery_file), "--output", str(tmp_path / "g.index"),
                 "--kind", "hnsw", "--M", "8"]) == 0
    index = GalleryIndex.load(tmp_path / "g.index")
    assert (index.kind, index.params["M"], index.paths) == ("hnsw", 8, gallery.paths)
    assert main(["query", "--index", str(tmp_path / "g.index"), "--features", str(query_file), "--k", "5",
                 "--output", str(tmp_path / "out" / "results.json")]) == 0
    out = json.loads((tmp_path / "out" / "results.json").read_text())
    scores, rows = index.search(queries.features, 5)
    assert out["k"] == 5 and out["score"].startswith("cosine similarity")
    assert [q["query"] for q in out["queries"]] == queries.paths
    for q, score, row in zip(out["queries"], scores.tolist(), rows.tolist(), strict=True):
        assert [r["row"] for r in q["results"]] == row
        assert [r["path"] for r in q["results"]] == [gallery.paths[i] for i in row]
        assert [r["score"] for r in q["results"]] == pytest.approx(score)
        assert [r["rank"] for r in q["results"]] == [1, 2, 3, 4, 5]
    assert "wrote" in capsys.readouterr().out


def test_query_rescores_with_the_part_distance_and_reranks(tmp_path, files, capsys):
    gallery_file, query_file, gallery, queries = files
    main(["build", "--features", str(gallery_file), "--output", str(tmp_path / "g.index")])
    capsys.readouterr()
    assert main(["query", "--index", str(tmp_path / "g.index"), "--features", str(query_file), "--k", "4",
                 "--shortlist", "30", "--rescore", "parts"]) == 0  # to stdout
    out = json.loads(capsys.readouterr().out)
    assert out["score"].startswith("part distance")
    _, shortlist = GalleryIndex.load(tmp_path / "g.index").search(queries.features, 30)
    full = pairwise_distance(queries.parts, gallery.parts, q_vis=queries.visibility, g_vis=gallery.visibility)
    for i, q in enumerate(out["queries"]):
        want = full[i, shortlist[i]].sort(stable=True)
        assert [r["row"] for r in q["results"]] == shortlist[i][want.indices[:4]].tolist()
        assert [r["score"] for r in q["results"]] == pytest.approx(want.values[:4].tolist(), abs=1e-6)
    assert main(["query", "--index", str(tmp_path / "g.index"), "--features", str(query_file), "--k", "4",
                 "--rescore", "parts", "--rerank", "--output", str(tmp_path / "r.json")]) == 0
    reranked = json.loads((tmp_path / "r.json").read_text())
    assert reranked["score"].startswith("re-ranked") and all(len(q["results"]) == 4 for q in reranked["queries"])


@pytest.mark.parametrize("case", ["missing", "dimension", "k", "no_parts", "not_features", "not_index"])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, files, capsys, case):
    gallery_file, query_file, _, _ = files
    main(["build", "--features", str(gallery_file), "--output", str(tmp_path / "g.index")])
    save_features(tmp_path / "wide.npz", feature_set(3, 2, "w", dim=24))
    save_features(tmp_path / "plain.npz", feature_set(3, 2, "p", parts=False))
    (tmp_path / "notes.txt").write_text("hello")
    query = ["query", "--index", str(tmp_path / "g.index"), "--output", str(tmp_path / "res.json"), "--features"]
    argv, message = {
        "missing": (query + [str(tmp_path / "nope.npz")], "nope.npz: no such features file"),
        "dimension": (query + [str(tmp_path / "wide.npz")], "holds 24-d features, the index"),
        "k": (query + [str(query_file), "--k", "301"], "--k 301 exceeds the gallery size 300"),
        "no_parts": (query + [str(tmp_path / "plain.npz"), "--rescore", "parts"],
                     "--rescore parts needs part features in"),
        "not_features": (["build", "--features", str(tmp_path / "notes.txt"), "--output", str(tmp_path / "x.index")],
                         "notes.txt: a features file ends in"),
        "not_index": (query[:1] + ["--index", str(tmp_path), "--features", str(query_file)],
                      "not a readable gallery index"),
    }[case]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m amfor.search: error: ") and message in err, err
    assert not (tmp_path / "res.json").exists() and not (tmp_path / "x.index").exists()


def test_a_missing_faiss_is_one_line_naming_the_extra(tmp_path, files, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "faiss" else real(name, *a))
    assert main(["build", "--features", str(files[0]), "--output", str(tmp_path / "g.index")]) == 2
    err = capsys.readouterr().err
    assert err == 'python -m amfor.search: error: amfor.search (the gallery index) needs faiss (not installed): ' \
                  'pip install "amfor[search]"\n'
    assert not (tmp_path / "g.index").exists()


@pytest.mark.slow
def test_the_module_runs_as_a_command(tmp_path, files):
    gallery_file, query_file, _, _ = files
    run_cli(["-m", "amfor.search", "build", "--features", str(gallery_file), "--output", str(tmp_path / "g.index")],
            tmp_path)
    proc = run_cli(["-m", "amfor.search", "query", "--index", str(tmp_path / "g.index"), "--features",
                    str(query_file), "--k", "400"], tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "python -m amfor.search: error: --k 400 exceeds the gallery size 300 of " \
                                  f"{tmp_path / 'g.index'}"
