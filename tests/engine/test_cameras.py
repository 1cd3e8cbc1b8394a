"""Camera ids in the engine: the model's camera count covers every dataset a run sees (or the config's), and
extraction treats a camera the model does not have as an unknown camera (-1)."""

from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image

from amfor.config import ConfigError, build_config
from amfor.data import ImageRecord, ReIDData
from amfor.engine.build import count_cameras
from amfor.evaluation.protocol import extract


def dataset(name: str, cams: dict[str, list[int]]) -> ReIDData:
    split = lambda s: [ImageRecord(f"{s}{k}.png", k, c) for k, c in enumerate(cams[s])]  # noqa: E731
    return ReIDData(name, "/nowhere", split("train"), split("query"), split("gallery"))


def test_the_camera_count_covers_every_dataset_the_run_sees_or_the_config():
    train = dataset("a", {"train": [0, 0], "query": [0], "gallery": [1]})
    other = dataset("b", {"train": [0], "query": [0], "gallery": [4]})  # data.test_name's dataset
    cfg = build_config(overrides=[])
    assert (count_cameras(cfg, train), count_cameras(cfg, train, other), count_cameras(cfg, train, None)) == (2, 5, 2)
    assert count_cameras(build_config(overrides=["model.kwargs.num_cameras=8"]), train, other) == 8
    with pytest.raises(ConfigError, match=r"model.kwargs.num_cameras=3.*camera ids up to 4"):
        count_cameras(build_config(overrides=["model.kwargs.num_cameras=3"]), train, other)


class CameraEcho(torch.nn.Module):
    """Features: the camera id each image was given."""

    input_size = (16, 8)
    num_cameras = 2

    def forward(self, images, camids=None, global_only=False):
        return {"features": camids.float()[:, None]}


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_extraction_treats_a_camera_beyond_the_models_as_unknown(tmp_path):
    records = []
    for k, cam in enumerate([0, 1, 5, -1]):
        path = tmp_path / f"{k}.png"
        Image.new("RGB", (8, 16)).save(path)
        records.append(ImageRecord(str(path), k, cam))
    log, handler = logging.getLogger("amfor.train"), Collect()  # the run's logger may not propagate (setup_logging)
    log.addHandler(handler)
    try:
        feats = extract(CameraEcho(), records, torch.device("cpu"), (16, 8), 4, 0, global_only=True)["features"]
    finally:
        log.removeHandler(handler)
    assert feats[:, 0].tolist() == [0, 1, -1, -1]
    assert any("camera ids [5] are beyond the model's 2 cameras" in line for line in handler.lines)
