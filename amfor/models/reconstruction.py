"""HPR-Decoder: human part reconstruction (docs/spec.md section 5), at patch level and at part level.

Patch level (masked image modelling on an extra masked view): `choose_masked_patches` drops the patches an
augmentation occluder covered, topped up at random to the mask ratio (amfor.ops.random_masking on occlusion
scores); the encoder sees only the kept tokens (amfor.ops.masked_gather, position embedding added in the same
pass); the decoder (`amfor.nn.MAEDecoder`) scatters them back on the grid with a learned mask token and its own
position embedding (amfor.ops.masked_scatter) and predicts every patch's pixels. The true pixels under an
augmentation occluder are not in the batch, so the pixel loss covers the patches masked at random only; the
occluded ones are still withheld from the encoder, which must describe the person without them.

Part level: `PartReconstructor` rebuilds part features from the foreground feature and the visible parts, the
hidden parts replaced by a learned mask token.
"""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from amfor.ops import random_masking


def choose_masked_patches(patch_occluded: torch.Tensor | None, batch: int, num_patches: int, mask_ratio: float,
                          generator: torch.Generator | None = None, device=None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which patches the masked view keeps.

    patch_occluded: bool [B, N] (patches an augmentation occluder covered) or None  ->  (index [B, K] of the kept
    patches, ascending; mask [B, N] True = withheld; target [B, N] True = withheld at random, i.e. with pixels
    to reconstruct). K = round(N (1 - mask_ratio)), at least 1: occluded patches go first, then random ones.
    """
    keep = max(1, round(num_patches * (1.0 - mask_ratio)))
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    scores = noise if patch_occluded is None else noise + 2.0 * patch_occluded.to(noise.device).float()
    index, mask = random_masking(batch, num_patches, keep, scores=scores, device=device)
    target = mask if patch_occluded is None else mask & ~patch_occluded.to(mask.device)
    return index, mask, target


class PartReconstructor(nn.Module):
    """ReconstructDecoder: [foreground, P parts], hidden parts -> mask token, blocks -> rebuilt parts [B, P, D]."""

    def __init__(self, embed_dim: int, num_parts: int, decoder_dim: int = 512, depth: int = 3, num_heads: int = 8,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(decoder_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1 + num_parts, decoder_dim))
        self.blocks = nn.ModuleList(Block(decoder_dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.predict = nn.Linear(decoder_dim, embed_dim)
        trunc_normal_(self.mask_token, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, foreground: torch.Tensor, parts: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """foreground [B, D], parts [B, P, D], hidden bool [B, P] (parts to rebuild) -> [B, P, D]."""
        x = self.embed(torch.cat([foreground[:, None], parts], dim=1))
        tokens = torch.where(hidden[..., None], self.mask_token.to(x.dtype), x[:, 1:])
        x = torch.cat([x[:, :1], tokens], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.predict(self.norm(x[:, 1:]))
