"""MAE-style masked training for any ViT on the fused ops: the encoder on the kept patches only
(`masked_gather`, position embedding added in the same pass) and a decoder that puts them back on the grid with a
mask token (`masked_scatter`).

    index, mask = random_masking(B, N, keep)                                 # or scores= for occlusion-driven
    latent = masked_forward_features(vit, images, index)                     # [B, P + K, D]
    pred = MAEDecoder.for_vit(vit, 3 * p * p)(latent, index)                 # [B, N, 3 p p]

`masked_forward_features` equals the model's own sequence (patch embedding, prefix tokens and positions, side
information, a gather of the kept tokens, the blocks, the final norm) exactly, without adding position embeddings to
the dropped tokens or ever materialising the full token sequence. The model is read through
`amfor.nn.vit_adapter.describe_vit`: timm, TransReID, PASS, HAP, CLIP(-ReID) and amfor's `ReIDViT`. `embed_tokens`
is that embedding step, shared with amfor's own backbone (`ReIDViT.embed`) and the adapter.
"""

from __future__ import annotations

import torch
from torch import nn

from amfor.ops import masked_gather, masked_scatter


def embed_tokens(patches: torch.Tensor, patch_pos: torch.Tensor | None, prefix: torch.Tensor | None = None,
                 prefix_pos: torch.Tensor | None = None, index: torch.Tensor | None = None, *,
                 check_index: bool = True) -> torch.Tensor:
    """A ViT's input tokens with their position embedding, all patches or the kept ones only (the masked view).

    patches: the patch embedding [B, N, D] (no position yet); patch_pos: its position embedding [N, D] or None;
    prefix: the learned prefix tokens (CLS, registers) [1, P, D] or None, prefix_pos: theirs [P, D] or None;
    index: [B, K] kept patch numbers (prefix excluded) or None (all N)  ->  [B, P + N', D] (N' = K or N): the
    prefix tokens, then the patches (in `index` order, gathered with `masked_gather`: no position is added to a
    dropped patch and the full sequence is never built). check_index=False skips the value check of `index` (a
    host sync), for indices the caller made.
    """
    if index is None:
        tokens = patches if patch_pos is None else patches + patch_pos
    else:
        tokens = masked_gather(patches, index, patch_pos, check_index=check_index)
    if prefix is None:
        return tokens
    prefix = prefix if prefix_pos is None else prefix + prefix_pos
    return torch.cat([prefix.expand(patches.shape[0], -1, -1), tokens], dim=1)


def masked_forward_features(vit: nn.Module, images: torch.Tensor, index: torch.Tensor, *,
                            camera_id: torch.Tensor | None = None, view_id: torch.Tensor | None = None,
                            cv_emb: torch.Tensor | None = None, check_index: bool = True) -> torch.Tensor:
    """A ViT's `forward_features` on the kept patches: images [B, C, H, W], index [B, K] (patch numbers, prefix
    tokens excluded)  ->  [B, P + K, D] (prefix tokens first, then the kept patches in `index` order, after the
    final norm).

    Any ViT `amfor.nn.vit_adapter.describe_vit` reads: timm (its `_pos_embed` sequence), amfor's ReIDViT (its own
    `embed`), TransReID / PASS / HAP (their `forward_features` order, SIE from `camera_id` / `view_id` [B]),
    CLIP's visual ViT (tokens [N, B, D] through its blocks, `ln_post`, no `proj`; CLIP-ReID's `cv_emb` [B, D] on the
    CLS token). Patch dropout put in by `apply_patch_dropout` does not run here. check_index=False skips the value
    check of `index` (a host sync): for indices the caller made, e.g. with `random_masking`.
    """
    from amfor.nn.vit_adapter import describe_vit

    parts = describe_vit(vit)
    x = parts.embed(images, index, camera_id=camera_id, view_id=view_id, cv_emb=cv_emb, check_index=check_index)
    return parts.norm(parts.forward_blocks(x))


class MAEDecoder(nn.Module):
    """MAE's decoder on masked_scatter: encoded tokens [B, P + K, D] and the kept indices [B, K] -> [B, N, out_dim].

    embed D -> decoder_dim, the K kept tokens scattered onto the N-token grid with a learned mask token and the
    decoder's learned position embedding in one pass, `depth` timm Blocks, a prediction head (e.g. 3 p p pixels).
    normalize_input: LayerNorm on the encoder output first (for an encoder without a final norm).
    forward(..., check_index=False) skips the value check of `index` (in range, unique per row: host syncs), for
    indices the caller made, e.g. the ones its encoder was given.
    """

    def __init__(self, embed_dim: int, num_patches: int, out_dim: int, decoder_dim: int = 512, depth: int = 1,
                 num_heads: int = 8, mlp_ratio: float = 4.0, num_prefix_tokens: int = 1,
                 normalize_input: bool = False) -> None:
        from timm.layers import trunc_normal_  # here, not at the top: amfor.nn imports without timm (issue 25)
        from timm.models.vision_transformer import Block

        super().__init__()
        self.num_patches, self.num_prefix_tokens = num_patches, num_prefix_tokens
        self.norm_in = nn.LayerNorm(embed_dim, eps=1e-6) if normalize_input else nn.Identity()
        self.embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(decoder_dim))
        self.pos_embed = nn.Parameter(torch.zeros(num_prefix_tokens + num_patches, decoder_dim))
        self.blocks = nn.ModuleList(Block(decoder_dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.pred = nn.Linear(decoder_dim, out_dim)
        trunc_normal_(self.mask_token, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)

    @classmethod
    def for_vit(cls, vit: nn.Module, out_dim: int, **kwargs) -> MAEDecoder:
        """A decoder sized for `vit` (any ViT `describe_vit` reads): its width D, its N patches on the grid its
        position embedding was made for (overlapping strides included) and its P prefix tokens."""
        from amfor.nn.vit_adapter import describe_vit

        parts = describe_vit(vit)
        return cls(parts.embed_dim, parts.grid[0] * parts.grid[1], out_dim, num_prefix_tokens=parts.num_prefix_tokens,
                   **kwargs)

    def forward(self, latent: torch.Tensor, index: torch.Tensor, *, check_index: bool = True) -> torch.Tensor:
        P = self.num_prefix_tokens
        x = self.embed(self.norm_in(latent))
        prefix = x[:, :P] + self.pos_embed[:P]
        grid = masked_scatter(x[:, P:], index, self.num_patches, self.mask_token, self.pos_embed[P:],
                              check_index=check_index)
        x = torch.cat([prefix, grid], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x[:, P:]))
