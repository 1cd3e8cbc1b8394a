"""The registered variants: names, parameter counts (as docs/model.md states them), a training step at true size."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import amfor
from amfor.models import create_model

DOC = Path(__file__).resolve().parents[2] / "docs" / "model.md"


def documented_counts() -> dict[str, tuple[int, int, int]]:
    """{variant: (parameters, trainable, backbone)} from the table in docs/model.md."""
    counts = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"\| `(amfor_\w+)` \|.*\| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \|$", line)
        if m:
            counts[m.group(1)] = tuple(int(g.replace(",", "")) for g in m.groups()[1:])
    return counts


def test_import_amfor_gives_the_registry():
    assert amfor.list_models() == ["amfor_vit_base_patch16", "amfor_vit_small_patch16", "amfor_vit_tiny_patch16"]
    with pytest.raises(ValueError, match="did you mean 'amfor_vit_tiny_patch16'"):
        amfor.create_model("amfor_vit_tiny_patch15", num_classes=3)


@pytest.mark.parametrize("name", ["amfor_vit_base_patch16", "amfor_vit_small_patch16", "amfor_vit_tiny_patch16"])
@pytest.mark.slow
def test_parameter_counts_match_the_docs(name):
    doc = documented_counts()
    assert name in doc, f"docs/model.md has no row for {name}"
    model = create_model(name, num_classes=751, num_cameras=6)
    got = (sum(p.numel() for p in model.parameters()),
           sum(p.numel() for p in model.parameters() if p.requires_grad),
           sum(p.numel() for p in model.backbone.parameters()))
    assert got == doc[name]


@pytest.mark.slow
def test_variant_shapes_follow_the_spec():
    base = create_model("amfor_vit_base_patch16", num_classes=10, stride=11)
    assert base.input_size == (256, 128) and base.backbone.num_patches == 242
    assert base.fusion.points == (1, 2, 4, 6, 8, 10) and base.text.encoder.width == 512
    tiny = create_model("amfor_vit_tiny_patch16", num_classes=10)
    assert tiny.input_size == (128, 64) and tiny.backbone.embed_dim == 192


@pytest.mark.slow
def test_tiny_rebuilds_hidden_parts_at_test_time_only_where_it_has_the_part_level():
    tiny = create_model("amfor_vit_tiny_patch16", num_classes=10)
    assert tiny.recon_detach and tiny.recon_fill  # chosen on the validation split (docs/model.md)
    without = create_model("amfor_vit_tiny_patch16", num_classes=10, part_recon=False)
    assert without.part_reconstructor is None and not without.recon_fill
    base = create_model("amfor_vit_base_patch16", num_classes=10)
    assert not base.recon_detach and not base.recon_fill  # the spec's reading


@pytest.mark.slow
@pytest.mark.parametrize("name, batch", [("amfor_vit_tiny_patch16", 4), ("amfor_vit_small_patch16", 2),
                                         ("amfor_vit_base_patch16", 2)])
def test_each_variant_trains_and_evaluates_at_its_input_size(name, batch):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, num_cameras=2)
    model.finish_stage1()
    H, W = model.input_size
    B = batch
    imgs = torch.randn(B, 3, H, W)
    pids = torch.arange(B) // 2
    cams = torch.arange(B) % 2
    masks = torch.randint(0, 9, (B, H, W))
    occ = torch.zeros(B, H, W, dtype=torch.bool)
    occ[:, H // 2:] = True
    out = model.train()(imgs, pids, cams, masks, occ)
    out["loss"].backward()
    assert all(torch.isfinite(v) for k, v in out.items() if k.startswith("loss"))
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []
    with torch.no_grad():
        feats = model.eval()(imgs, cams)
    D = model.backbone.embed_dim
    assert feats["features"].shape == (B, 9, D) and feats["visibility"].shape == (B, 9)
