"""`python -m amfor.visualize`: the part maps and visibility of a few queries next to their ranked lists, as a PNG;
and the model method it draws from, `AMFOR.part_maps`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from amfor.evaluation.visualize import BLUE, BORDER, GAP, GREEN, LEGEND, PART_COLORS, RED, STRIP
from amfor.visualize import main

TILE = (128, 64)  # the picture's image size (H, W): ranked_with_parts' default


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from amfor_checkpoint import save_small_amfor

    return save_small_amfor(tmp_path_factory.mktemp("ckpt") / "tiny.pt", "amfor_vit_tiny_patch16")


def write_images(folder: Path, count: int, seed: int, names: list[str] | None = None) -> list[Path]:
    """`count` images (or one per name in `names`) of several sizes and both formats: a bright figure on a dark,
    noisy background."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count if names is None else len(names)):
        h, w = 120 + 10 * i, 50 + 4 * i
        img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        img[h // 8: 7 * h // 8, w // 4: 3 * w // 4] = rng.integers(120, 255, 3, dtype=np.uint8)
        path = folder / (names[i] if names is not None else f"{i:03d}.{'png' if i % 2 else 'jpg'}")
        Image.fromarray(img).save(path)
        paths.append(path)
    return paths


def test_it_draws_the_queries_part_maps_and_ranked_lists(checkpoint, tmp_path, capsys):
    write_images(tmp_path / "query", 3, seed=0)
    write_images(tmp_path / "gallery" / "cam1", 4, seed=1)  # folders are read recursively
    write_images(tmp_path / "gallery" / "cam2", 3, seed=2)
    out = tmp_path / "pictures" / "parts.png"
    num, topk = 2, 5
    assert main(["--checkpoint", str(checkpoint), "--query", str(tmp_path / "query"), "--gallery",
                 str(tmp_path / "gallery"), "--num", str(num), "--topk", str(topk), "--output", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    picture = np.asarray(Image.open(out).convert("RGB"))
    tile_h, tile_w = TILE[0] + 2 * BORDER, TILE[1] + 2 * BORDER
    # the legend, then one row per query: the image, the image with its part maps, the visibility strip, a gap
    # and the top-k gallery images
    assert picture.shape == (LEGEND + num * tile_h, (topk + 2) * tile_w + STRIP + GAP, 3)
    for row in range(num):
        top = LEGEND + row * tile_h + BORDER
        image = picture[top + 20: top + TILE[0], BORDER: tile_w - BORDER].astype(int)  # below the label
        overlay = picture[top + 20: top + TILE[0], tile_w + BORDER: 2 * tile_w - BORDER].astype(int)
        assert np.abs(image - overlay).mean() > 5, "the part maps are not drawn over the query"
        strip = picture[top: top + TILE[0], 2 * tile_w: 2 * tile_w + STRIP].reshape(-1, 3)
        assert {tuple(c) for c in strip.tolist()} & set(PART_COLORS), "no part colour in the visibility strip"
        assert border_colors(picture, row, topk) == [BLUE] * topk  # no identities in these names


def border_colors(picture: np.ndarray, row: int, slots: int) -> list[tuple[int, int, int] | None]:
    """The border colour of each ranked tile of a row (None: an empty slot), read on the tile's left edge."""
    tile_h, tile_w = TILE[0] + 2 * BORDER, TILE[1] + 2 * BORDER
    y, x0 = LEGEND + row * tile_h + tile_h // 2, 2 * tile_w + STRIP + GAP
    found = []
    for k in range(slots):
        pixel = picture[y, x0 + k * tile_w + 1].astype(int)
        found.append(next((c for c in (GREEN, RED, BLUE) if np.abs(pixel - np.array(c)).max() <= 3), None))
    return found


def test_market_names_give_green_and_red_borders_without_same_camera_matches(checkpoint, tmp_path):
    """Files named as Market-1501's: the query's identity green, others red, its identity under its own camera left
    out (as the protocol does), whatever the (untrained) model ranks first."""
    write_images(tmp_path / "q", 0, seed=0, names=["0001_c1s1_000101_00.jpg"])
    write_images(tmp_path / "g", 0, seed=1, names=["0001_c1s1_000151_00.jpg", "0001_c2s1_000201_00.jpg",
                                                   "0002_c1s1_000301_00.jpg", "0003_c2s1_000401_00.jpg"])
    out = tmp_path / "market.png"
    assert main(["--checkpoint", str(checkpoint), "--query", str(tmp_path / "q"), "--gallery", str(tmp_path / "g"),
                 "--topk", "5", "--output", str(out)]) == 0
    found = border_colors(np.asarray(Image.open(out).convert("RGB")), 0, 5)
    assert sorted(found[:3]) == sorted([GREEN, RED, RED]) and found[3:] == [None, None]


@pytest.mark.parametrize("case", ["empty query folder", "missing gallery", "not an image", "missing checkpoint",
                                  "no part branch", "not png", "zero topk"])
def test_bad_input_gets_one_line_and_no_file(checkpoint, tmp_path, capsys, case):
    write_images(tmp_path / "query", 2, seed=0)
    gallery = write_images(tmp_path / "gallery", 2, seed=1)
    (tmp_path / "empty").mkdir()
    args = {"--checkpoint": str(checkpoint), "--query": str(tmp_path / "query"),
            "--gallery": str(tmp_path / "gallery"), "--output": str(tmp_path / "out.png")}
    named = None
    if case == "empty query folder":
        args["--query"] = named = str(tmp_path / "empty")
    elif case == "missing gallery":
        args["--gallery"] = named = str(tmp_path / "nowhere")
    elif case == "not an image":
        gallery[0].write_text("not a picture")
        named = str(gallery[0])
    elif case == "missing checkpoint":
        args["--checkpoint"] = named = str(tmp_path / "gone.pt")
    elif case == "no part branch":
        args["--checkpoint"] = named = str(no_parts_checkpoint(tmp_path / "noparts.pt"))
    elif case == "not png":
        args["--output"] = named = str(tmp_path / "out.jpg")
    argv = [x for kv in args.items() for x in kv] + (["--topk", "0"] if case == "zero topk" else [])
    if case == "zero topk":  # argparse's own error: usage and one error line
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        code = exit_info.value.code
    else:
        code = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert "Traceback" not in "\n".join(err) and err[-1].startswith(("python -m amfor.visualize: error:", "usage"))
    if case != "zero topk":
        assert len(err) == 1 and named in err[0], err
    assert not (tmp_path / "out.png").exists() and not (tmp_path / "out.jpg").exists()


def no_parts_checkpoint(path: Path) -> Path:
    """The same small model built without its part branch."""
    from amfor.config import build_config, to_dict
    from amfor.engine.build import build_model
    from amfor.engine.checkpoint import save_checkpoint

    cfg = build_config(None, ["model.kwargs.parts=false", "model.kwargs.teacher_student=false",
                              "model.kwargs.embed_dim=32", "model.kwargs.depth=2", "model.kwargs.num_heads=2"])
    model = build_model(cfg, 3, 0)
    return save_checkpoint({"config": to_dict(cfg), "model_name": cfg.model.name, "num_classes": 3,
                            "num_cameras": 0, "stage1_finished": True, "model": model.state_dict()}, path)


def test_part_maps_are_the_parsing_heads_probabilities_on_the_grid(checkpoint):
    """[B, P, h, w]: the pixel-to-part classifier's softmax over the eval encoder's tokens, background left out;
    no random number drawn, the eval features unchanged."""
    from amfor.deploy.load import load_for_inference

    model, _, _ = load_for_inference(checkpoint)
    images = torch.randn(3, 3, *model.input_size, generator=torch.Generator().manual_seed(0))
    before = model(images)["features"]
    rng = torch.get_rng_state()
    maps = model.part_maps(images)
    assert torch.equal(torch.get_rng_state(), rng)
    h, w = model.backbone.grid_size
    assert maps.shape == (3, model.num_parts, h, w)
    with torch.no_grad():
        M = model.forward_encoder(images, None, model.text_keys())
        probs = model.forward_parts(M, model.forward_global(M), teacher=False)["probs"]  # [B, N, 1 + P]
    torch.testing.assert_close(maps.flatten(2).transpose(1, 2), probs[..., 1:])
    assert (maps.sum(1) <= 1 + 1e-5).all() and (maps >= 0).all()
    torch.testing.assert_close(model(images)["features"], before)
    with pytest.raises(RuntimeError, match="eval"):
        model.train().part_maps(images)
