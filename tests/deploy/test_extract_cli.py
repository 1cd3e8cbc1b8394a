"""`python -m amfor.extract` end to end: a folder with nested images, a corrupt image and a non-image to a features
file (.safetensors and .npz), globs and lists, torchrun over two processes, and bad input (one line, exit 2, no
file)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from cli_runs import run_cli
from extract_support import image_folder, small_amfor, write_checkpoint

import amfor
from amfor.deploy.feature_file import load_features
from amfor.export import main as export_main
from amfor.extract import main as extract_main

CAMERAS = {"0001_c1s1_000151_01.jpg": 0, "0001_c2s1_000301_01.png": 1, "cam_a/0002_c3s2_000101_02.jpg": 2,
           "cam_a/deep/0003_c1s3_000051_01.bmp": 0, "cam_a/deep/x.jpeg": -1, "cam_b/0004_c2s1_001001_01.png": 1}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(folder of images, its listing, checkpoint, weights file, the model)."""
    root = tmp_path_factory.mktemp("extract")
    listing = image_folder(root / "images")
    model = small_amfor()
    checkpoint = write_checkpoint(model, root / "run" / "checkpoints" / "last.pt")
    assert export_main(["--checkpoint", str(checkpoint), "--format", "weights"]) == 0
    return root / "images", listing, checkpoint, checkpoint.with_suffix(".safetensors"), model


def error_line(capsys) -> str:
    """The one error line (after the progress bar, when extraction had begun); no traceback."""
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("python -m amfor.extract: error: "), err
    return last


def test_a_folder_to_safetensors_with_parts_and_cameras(setup, tmp_path, capsys):
    images, listing, checkpoint, _, model = setup
    out = tmp_path / "feats.safetensors"
    assert extract_main(["--checkpoint", str(checkpoint), "--input", str(images), "--output", str(out), "--parts",
                         "--camids-from-names", "--batch-size", "4"]) == 0
    captured = capsys.readouterr()
    feats = load_features(out)
    assert feats.paths == listing["good"]  # relative to the folder, sorted; the corrupt and the text file are not
    assert feats.camids.tolist() == [CAMERAS[p] for p in feats.paths]
    want = amfor.Extractor(model, device="cpu", batch_size=4)([images / p for p in feats.paths], feats.camids,
                                                             parts=True)
    assert torch.equal(feats.parts, want.parts) and torch.equal(feats.visibility, want.visibility)
    assert torch.equal(feats.features, want.features)
    skipped = json.loads(feats.metadata["skipped"])
    assert [name for name, _ in skipped] == listing["bad"] and "cannot read image" in skipped[0][1]
    assert f"skipped {listing['bad'][0]}" in captured.err
    assert f"wrote {out}: 6 images" in captured.out and "1 skipped" in captured.out
    assert feats.metadata["checkpoint"] == str(checkpoint)
    assert json.loads(feats.metadata["data_config"])["size"] == list(model.input_size)


def test_the_weights_file_to_npz_gives_the_checkpoints_features(setup, tmp_path):
    images, listing, checkpoint, weights, _ = setup
    from_checkpoint, from_weights = tmp_path / "a.npz", tmp_path / "b.npz"
    for ckpt, out in ((checkpoint, from_checkpoint), (weights, from_weights)):
        assert extract_main(["--checkpoint", str(ckpt), "--input", str(images), "--output", str(out)]) == 0
    a, b = load_features(from_checkpoint), load_features(from_weights)
    assert a.paths == b.paths == listing["good"] and a.parts is None and a.camids is None
    assert torch.equal(a.features, b.features) and a.features.shape == (6, 32)


def test_a_glob_and_a_list(setup, tmp_path):
    images, listing, checkpoint, weights, _ = setup
    out = tmp_path / "glob.npz"
    assert extract_main(["--checkpoint", str(weights), "--input", str(images / "cam_a" / "**" / "*.jp*g"),
                         "--output", str(out)]) == 0
    assert load_features(out).paths == ["0002_c3s2_000101_02.jpg", "deep/x.jpeg"]  # relative to the glob's folder
    lst = tmp_path / "list.txt"
    lst.write_text(f"# two images and a missing one\n{images / listing['good'][1]}\n\n../gone.jpg\n"
                   f"{images / listing['good'][0]}\n")
    out = tmp_path / "list.safetensors"
    assert extract_main(["--checkpoint", str(weights), "--input", str(lst), "--output", str(out)]) == 0
    feats = load_features(out)
    assert feats.paths == [str(images / listing["good"][1]), str(images / listing["good"][0])]
    assert [name for name, _ in json.loads(feats.metadata["skipped"])] == ["../gone.jpg"]
    whole = load_features(tmp_path / "glob.npz")  # the same model, the same preprocessing: rows match by image
    assert whole.features.shape[1] == feats.features.shape[1]


@pytest.mark.parametrize("case", ["no input", "empty folder", "not a list", "bad output", "bad checkpoint",
                                  "features as checkpoint", "all unreadable", "bad device"])
def test_bad_input_is_one_line_exit_2_and_no_file(setup, tmp_path, capsys, case):
    images, listing, checkpoint, _, _ = setup
    out, inp, ckpt = tmp_path / "out.safetensors", images, checkpoint
    if case == "no input":
        inp, named = tmp_path / "nowhere", f"--input {tmp_path / 'nowhere'}: no such folder or list"
    elif case == "empty folder":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "readme.md").write_text("no images here")
        inp, named = tmp_path / "empty", f"--input {tmp_path / 'empty'}: no image files"
    elif case == "not a list":
        inp, named = checkpoint, f"--input {checkpoint}: a folder, a glob pattern or a .txt list"
    elif case == "bad output":
        out = tmp_path / "out.csv"
        named = f"--output {out}: a features file ends in .safetensors or .npz"
    elif case == "bad checkpoint":
        ckpt = tmp_path / "model.pt"
        ckpt.write_bytes(b"garbage")
        named = f"cannot read checkpoint {ckpt}"
    elif case == "features as checkpoint":
        assert extract_main(["--checkpoint", str(checkpoint), "--input", str(images / "cam_b"), "--output",
                             str(tmp_path / "f.safetensors")]) == 0
        capsys.readouterr()
        ckpt, named = tmp_path / "f.safetensors", f"{tmp_path / 'f.safetensors'} is a features file"
    elif case == "bad device":
        inp, named = images / "cam_b", "--device tpu9: "
    else:
        (tmp_path / "broken").mkdir()
        shutil.copy(images / listing["bad"][0], tmp_path / "broken" / "a.jpg")
        inp, named = tmp_path / "broken", "none of the 1 images could be read"
    before = sorted(tmp_path.rglob("*"))
    device = "tpu9" if case == "bad device" else "auto"
    assert extract_main(["--checkpoint", str(ckpt), "--input", str(inp), "--output", str(out), "--device", device]) == 2
    line = error_line(capsys)
    assert named in line and "on_bad_image" not in line  # no dataset here: no hint about a dataset's bad images
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, not even a temporary file


@pytest.mark.slow
def test_torchrun_on_two_processes_equals_one(setup, tmp_path):
    """Two CPU processes (gloo), each a share of the images, rank 0 writes: the file of one process, and the
    console command's behaviour (no traceback on bad input) in a real process."""
    images, _, _, weights, _ = setup
    args = ["--checkpoint", str(weights), "--input", str(images), "--parts", "--camids-from-names", "--batch-size",
            "1", "--device", "cpu"]  # batches of one: the same arithmetic whichever process runs an image
    run_cli(["-m", "amfor.extract", *args, "--output", str(tmp_path / "one.safetensors")], tmp_path)
    run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "amfor.extract", *args,
             "--output", str(tmp_path / "two.safetensors")], tmp_path)
    one, two = load_features(tmp_path / "one.safetensors"), load_features(tmp_path / "two.safetensors")
    assert one.paths == two.paths and torch.equal(one.camids, two.camids) and one.metadata == two.metadata
    for name in ("features", "parts", "visibility"):
        assert torch.equal(getattr(two, name), getattr(one, name)), name
    proc = run_cli(["-m", "amfor.extract", "--checkpoint", str(weights), "--input", str(tmp_path / "none"),
                    "--output", str(tmp_path / "x.npz")], tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and not (tmp_path / "x.npz").exists()



def test_safetensors_output_without_the_extra_names_it(setup, tmp_path, capsys, monkeypatch):
    import importlib.util

    images, _, checkpoint, _, _ = setup
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "safetensors" else
                        find_spec(name, *a))
    out = tmp_path / "f.safetensors"
    assert extract_main(["--checkpoint", str(checkpoint), "--input", str(images), "--output", str(out)]) == 2
    assert 'pip install "amfor[safetensors]"' in error_line(capsys) and not out.exists()
