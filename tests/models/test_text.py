"""Text branch: the prompt run on its own length equals open_clip's 77-token forward; CLIP weights load; the bank."""

from __future__ import annotations

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from amfor.models.text import NUM_CONTEXT, PROMPT, PromptLearner, TextBranch, TextEncoder, contrastive_losses


def small_encoder(seed: int = 0) -> TextEncoder:
    torch.manual_seed(seed)
    return TextEncoder(width=64, heads=2, layers=2, output_dim=32).eval()


def test_prompt_on_its_own_length_equals_the_full_context():
    """CLIP's text transformer is causal and pools at end-of-text: the tokens after it cannot matter."""
    enc = small_encoder()
    tokens = SimpleTokenizer()(PROMPT)  # [1, 77]
    with torch.no_grad():
        full = enc.tower(tokens)
        learner = PromptLearner(enc, num_classes=3)
        x_id = SimpleTokenizer().encode("X")[0]
        learner.context.copy_(enc.token_embedding(torch.tensor([x_id] * NUM_CONTEXT)).expand(3, -1, -1))
        ours = enc(learner(torch.tensor([1])), learner.eot)
    assert learner.eot == 11 and learner(torch.tensor([0, 2])).shape == (2, 12, 64)
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-6)


def test_clip_weights_load_from_a_local_file(tmp_path):
    src = small_encoder(seed=1)
    state = {f"text.{k}": v for k, v in src.tower.state_dict().items()}
    state["visual.conv1.weight"] = torch.zeros(8, 3, 16, 16)  # the image tower's keys are ignored
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": state}, path)
    dst = small_encoder(seed=2)
    assert dst.load_clip(path) == []
    emb = torch.randn(2, 12, 64)
    torch.testing.assert_close(dst(emb, 11), src(emb, 11))
    other = tmp_path / "vit.pt"
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(ValueError, match="vit.pt: no CLIP text-tower key"):
        dst.load_clip(other)


def test_the_branch_is_frozen_but_its_prompts_and_projection_learn():
    torch.manual_seed(0)
    branch = TextBranch(num_classes=5, visual_dim=48, width=64, heads=2, layers=1, output_dim=32)
    assert not any(p.requires_grad for p in branch.encoder.parameters())
    branch.train()
    assert not branch.encoder.training
    feats = branch.text_to_visual(branch.text_features(torch.tensor([0, 3])))
    feats.sum().backward()
    assert branch.prompts.context.grad[[0, 3]].abs().sum() > 0 and branch.prompts.context.grad[1].abs().sum() == 0
    branch.build_bank()
    assert branch.visual_bank("all").shape == (5, 48) and branch.visual_bank("mean").shape == (1, 48)


def test_contrastive_losses_prefer_matching_texts():
    torch.manual_seed(0)
    text = torch.randn(3, 16)
    labels = torch.tensor([0, 0, 1, 2])
    aligned = contrastive_losses(text[labels] + 0.01 * torch.randn(4, 16), text, labels, scale=20.0)
    shuffled = contrastive_losses(text[labels.roll(1)], text, labels, scale=20.0)
    # i2t ~ 0 when aligned; t2i cannot go below the mean log(#positives): identity 0 has two images, log 2 / 3
    assert aligned[0] < 0.05 and abs(aligned[1] - torch.log(torch.tensor(2.0)) / 3) < 0.05
    assert all(s > 1.0 for s in shuffled)
