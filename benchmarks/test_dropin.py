"""Drop-in ops in a model we did not write: a timm ViT's training step, unpatched vs patched with amfor.nn.

- `masked`: MAE-style masked training of a timm ViT-S/16 at 256x128 (CPU: ViT-Ti/16 at 128x64), mask ratio 0.75:
  `reference` = the eager MAE sequence (all tokens embedded with `_pos_embed`, argsort of noise, `torch.gather` of
  the kept tokens, blocks, a decoder fed by `torch.scatter` of the kept tokens among mask tokens) against
  `amfor` = `masked_forward_features` + `MAEDecoder` (masked_gather / masked_scatter). Both compute the same loss.
- `pool`: a timm ViT with `global_pool="map"`, timm's `AttentionPoolLatent` (`reference`) vs `QueryFusionPool`
  (`amfor`, the same output).
A step is forward + backward + SGD update; extra_info: images_per_s. Each provider's loss is checked against the
other's before timing. The `amfor` rows also time both providers in the same interleaved rounds (A B, B A, ...)
and record the per-round speed-up over the reference, its median and bootstrap interval (`paired_speedup`,
`paired_speedup_ci`, `paired_rounds`): separate tests minutes apart compare the machine's drift as much as the
providers (`python -m benchmarks.plot` shows the paired figure where there is one).
"""

from __future__ import annotations

import pytest
import timm
import torch

from amfor.nn import MAEDecoder, apply_query_fusion_pool, masked_forward_features
from amfor.ops import random_masking
from benchmarks.common import REFERENCE, interleaved_rounds, interleaved_times, measure, paired_speedup

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ARCH, SIZE, BATCH = ("vit_small_patch16_224", (256, 128), 64) if DEVICE == "cuda" else \
    ("vit_tiny_patch16_224", (128, 64), 32)
RATIO = 0.75


def make_vit(**kwargs):
    torch.manual_seed(0)
    return timm.create_model(ARCH, pretrained=False, img_size=SIZE, num_classes=0, **kwargs).to(DEVICE)


class Step:
    """A training step: `loss()` (defined by the case), backward, SGD update, a device sync."""

    opt: torch.optim.Optimizer

    def loss(self) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self) -> torch.Tensor:
        loss = self.loss()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return loss


class MaskedStep(Step):
    """MAE-style step: encoder on the kept patches, decoder over the grid, MSE on the withheld patches."""

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.vit = make_vit()
        D, N = self.vit.embed_dim, self.vit.patch_embed.num_patches
        self.decoder = MAEDecoder(D, N, 3 * 16 * 16, decoder_dim=128, depth=1, num_heads=4).to(DEVICE)
        params = list(self.vit.parameters()) + list(self.decoder.parameters())
        self.opt = torch.optim.SGD(params, lr=1e-3)
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(BATCH, 3, *SIZE, generator=g).to(DEVICE)
        self.target = torch.randn(BATCH, N, 3 * 16 * 16, generator=g).to(DEVICE)
        self.index, self.mask = random_masking(BATCH, N, round(N * (1 - RATIO)), device=DEVICE)

    def encode_decode_reference(self) -> torch.Tensor:
        vit, dec = self.vit, self.decoder
        x = vit._pos_embed(vit.patch_embed(self.images))  # every token embedded
        keep = torch.cat([torch.zeros_like(self.index[:, :1]), self.index + 1], dim=1)
        x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))
        latent = vit.norm(vit.blocks(vit.norm_pre(x)))
        y = dec.embed(latent)
        grid = dec.mask_token.expand(BATCH, dec.num_patches, -1)
        grid = grid.scatter(1, self.index[..., None].expand(-1, -1, y.shape[-1]), y[:, 1:]) + dec.pos_embed[1:]
        y = torch.cat([y[:, :1] + dec.pos_embed[:1], grid], dim=1)
        for blk in dec.blocks:
            y = blk(y)
        return dec.pred(dec.norm(y[:, 1:]))

    def loss(self) -> torch.Tensor:
        if self.provider == REFERENCE:
            pred = self.encode_decode_reference()
        else:
            pred = self.decoder(masked_forward_features(self.vit, self.images, self.index), self.index)
        per_patch = (pred - self.target).pow(2).mean(-1)
        return (per_patch * self.mask).sum() / self.mask.sum()


class PoolStep(Step):
    """Pooled-feature step of a `global_pool="map"` ViT (a linear identity head on the pooled feature)."""

    def __init__(self, provider: str) -> None:
        self.vit = make_vit(global_pool="map")
        self.head = torch.nn.Linear(self.vit.embed_dim, 100).to(DEVICE)
        if provider != REFERENCE:
            apply_query_fusion_pool(self.vit)
        self.opt = torch.optim.SGD(list(self.vit.parameters()) + list(self.head.parameters()), lr=1e-3)
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(BATCH, 3, *SIZE, generator=g).to(DEVICE)
        self.labels = torch.randint(0, 100, (BATCH,), generator=g).to(DEVICE)

    def loss(self) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.head(self.vit(self.images)), self.labels)


STEPS = {"masked": MaskedStep, "pool": PoolStep}


@pytest.mark.parametrize("provider", [REFERENCE, "amfor"])
@pytest.mark.parametrize("case", list(STEPS))
def test_dropin_training_step(benchmark, case, provider):
    step = STEPS[case](provider)
    other = STEPS[case](REFERENCE if provider != REFERENCE else "amfor")
    with torch.no_grad():
        torch.testing.assert_close(step.loss(), other.loss(), rtol=1e-4, atol=1e-5)
    ms = measure(benchmark, step, DEVICE, rounds=5 if DEVICE == "cpu" else 20, case=case, provider=provider,
                 model=ARCH, batch=BATCH)
    benchmark.extra_info["images_per_s"] = BATCH / (ms * 1e-3)
    if provider != REFERENCE:
        rounds = interleaved_rounds(12 if DEVICE == "cpu" else 40)
        times = interleaved_times({REFERENCE: other, provider: step}, rounds)
        median, low, high = paired_speedup(times[REFERENCE], times[provider])
        benchmark.extra_info.update(paired_speedup=median, paired_speedup_ci=[low, high], paired_rounds=rounds)
