"""Stage 1 caches the image features of the training set with the model in eval mode (no dropout, no drop-path)."""

from __future__ import annotations

import torch
from cli_runs import standin_overrides
from standin_model import StandIn

from amfor.config import build_config
from amfor.engine.runner import Run
from amfor.utils import distributed as du


class DropoutFeatures(StandIn):
    """The stand-in whose stage-1 features pass through its dropout, as a ViT's pass through drop-path."""

    def stage1_features(self, images, camids):
        return self.drop(super().stage1_features(images, camids))


def create_dropout_standin(num_classes: int, num_cameras: int = 0, pretrained=None, **kwargs) -> DropoutFeatures:
    return DropoutFeatures(num_classes, num_cameras, pretrained, **kwargs)


def test_stage1_features_are_cached_in_eval_mode(tiny_root, tmp_path):
    cfg = build_config(overrides=standin_overrides(tiny_root, **{
        "output": tmp_path / "run", "model.name": f"{__name__}:create_dropout_standin",
        "model.kwargs.dropout": 0.5}))
    run = Run(cfg)
    try:
        run.build()
        assert run.model.training
        feats, pids = run.cache_features()  # before: the wrapper's eval() missed the model, dropout was on
        assert run.model.training  # the model's own mode is back
        run.model.eval()
        want, _ = run.cache_features()
    finally:
        run.log.close()
        du.cleanup()
    assert feats.shape == (len(run.data.train), 16) and pids.shape == (len(run.data.train),)
    assert want.abs().sum() > 0
    torch.testing.assert_close(feats, want)
