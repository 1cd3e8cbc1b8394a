"""A trained model loads for evaluation and export without the pretrained files it started from."""

from amfor.config import build_config
from amfor.deploy.load import config_of


def test_the_checkpoint_config_reads_no_pretrained_file_again(tmp_path):
    base = build_config(None, [f"model.pretrained={tmp_path / 'gone-vit.pth'}",
                               f"model.kwargs.clip_weights={tmp_path / 'gone-clip.pt'}"])
    cfg = config_of({"config": base})
    assert cfg.model.pretrained is None and cfg.model.kwargs.clip_weights is None
    assert base.model.kwargs.clip_weights is not None  # the checkpoint's own config is left as it was
