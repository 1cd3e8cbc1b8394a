"""The text tower loads real CLIP files, each built here in its real format: OpenAI's TorchScript archive (read as
open_clip's `load_openai_model` reads it) and open_clip checkpoints (.pt training checkpoint, .safetensors)."""

from __future__ import annotations

import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, convert_weights_to_lp
from open_clip.openai import load_openai_model
from open_clip.tokenizer import SimpleTokenizer
from safetensors.torch import save_file
from torch import nn

from amfor.models.text import PROMPT, TextBranch, TextEncoder
from tests.models.checkpoint_files import save_torchscript

TEXT = dict(width=64, heads=1, layers=2, output_dim=32)  # OpenAI's rule: heads = width // 64


def tiny_clip(quick_gelu: bool) -> CLIP:
    """open_clip's CLIP in OpenAI's layout, small: a 1-block visual tower at 32x32, a 2-layer text tower."""
    torch.manual_seed(0)
    clip = CLIP(32, vision_cfg=CLIPVisionCfg(layers=1, width=64, patch_size=16, image_size=32),
                text_cfg=CLIPTextCfg(width=64, heads=1, layers=2), quick_gelu=quick_gelu)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in clip.parameters():  # every tensor random (a fresh init has LayerNorms at 1 / 0)
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return clip.eval()




def openai_archive(path) -> CLIP:
    """OpenAI's ViT-B-16.pt in miniature: a TorchScript archive of CLIP's state dict, conv / linear / attention
    weights in float16, plus the integer input_resolution / context_length / vocab_size entries."""
    clip = tiny_clip(quick_gelu=True)
    convert_weights_to_lp(clip)
    save_torchscript(dict(clip.state_dict(), input_resolution=torch.tensor(32), context_length=torch.tensor(77),
                          vocab_size=torch.tensor(49408)), path)
    return clip.float()


def text_state(clip: CLIP) -> dict[str, torch.Tensor]:
    keys = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
    return {k: v for k, v in clip.state_dict().items() if k.startswith(keys)}


TOKENS = SimpleTokenizer()([PROMPT.replace("X X X X", "tall"), "a photo of a person in a red coat."])


def test_openai_torchscript_archive(tmp_path):
    path = tmp_path / "ViT-B-16.pt"
    source = openai_archive(path)
    enc = TextEncoder(**TEXT).eval()
    assert enc.load_clip(path) == []
    assert enc.quick_gelu  # OpenAI's activation, as open_clip builds OpenAI models
    mine = enc.tower.state_dict()
    for key, value in text_state(source).items():
        assert torch.equal(mine[key], value.float()), key
    reference = load_openai_model(str(path), precision="fp32", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(enc.tower(TOKENS), reference.encode_text(TOKENS), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["epoch_32.pt", "open_clip_model.safetensors"])
def test_open_clip_checkpoint(tmp_path, name):
    """open_clip's training checkpoint ({"epoch", "name", "state_dict": module.*, "optimizer"}) and its Hugging
    Face .safetensors (a plain state dict): GELU towers, loaded as open_clip's load_checkpoint reads them."""
    source = tiny_clip(quick_gelu=False)
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    else:
        torch.save({"epoch": 32, "name": "run", "state_dict": {f"module.{k}": v for k, v in
                                                               source.state_dict().items()},
                    "optimizer": {"state": {}, "param_groups": []}}, path)
    enc = TextEncoder(**TEXT).eval()
    assert enc.load_clip(path) == [] and not enc.quick_gelu
    mine = enc.tower.state_dict()
    for key, value in text_state(source).items():
        assert torch.equal(mine[key], value), key
    with torch.no_grad():
        torch.testing.assert_close(enc.tower(TOKENS), source.encode_text(TOKENS), atol=1e-5, rtol=1e-5)


def test_branch_from_an_openai_archive_is_frozen(tmp_path):
    path = tmp_path / "ViT-B-16.pt"
    openai_archive(path)
    branch = TextBranch(num_classes=3, visual_dim=16, width=64, heads=1, layers=2, output_dim=32,
                        clip_weights=str(path))
    assert branch.encoder.quick_gelu and not any(p.requires_grad for p in branch.encoder.parameters())
    assert branch.text_features(torch.tensor([0, 2])).shape == (2, 32)


def test_errors_name_the_file(tmp_path):
    enc = TextEncoder(**TEXT)
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        enc.load_clip(tmp_path / "nothere.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ValueError, match="garbage.pt is not readable as a CLIP checkpoint"):
        enc.load_clip(garbage)
    scripted = tmp_path / "resnet_jit.pt"
    torch.jit.save(torch.jit.script(nn.Linear(3, 4)), str(scripted))  # a TorchScript archive, not a CLIP
    with pytest.raises(ValueError, match="resnet_jit.pt is not readable as an OpenAI CLIP TorchScript archive"):
        enc.load_clip(scripted)
    wide = tmp_path / "ViT-B-16.pt"
    openai_archive(wide)
    with pytest.raises(ValueError, match="ViT-B-16.pt: its text tower has another shape"):
        TextEncoder(width=128, heads=2, layers=2, output_dim=32).load_clip(wide)
    with pytest.raises(ValueError, match="ViT-B-16.pt: its text tower has 2 layers, this model's 3"):
        TextEncoder(width=64, heads=1, layers=3, output_dim=32).load_clip(wide)
