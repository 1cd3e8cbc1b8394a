"""Learnable-query pooling on QueryFusion: a drop-in for timm's `AttentionPoolLatent` (`global_pool="map"`), and the
same pooling over the tokens of several blocks at once.

`QueryFusionPool.from_timm(vit.attn_pool)` takes timm's weights and gives the same output (tested): latent queries
through `q`, keys and values through `kv` (the key bias is dropped: the softmax cancels it), SDPA's scale, the
output projection and the residual MLP. With `num_layers > 1` the queries attend over the tokens of L layers (per-layer
softmax, mixed by learned layer weights: one fused `query_fusion_attention` call, nothing stacked), e.g. the last
blocks of a ReID ViT: `apply_query_fusion_pool(vit, layers=(-3, -2, -1))`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from amfor.nn.query_fusion import QueryFusion


class QueryFusionPool(nn.Module):
    """latent_len learned queries pool [B, N, D] (or L x [B, N, D]) -> [B, D] ("token"/"avg") or [B, Q, D] ("")."""

    def __init__(self, dim: int, num_heads: int = 8, latent_len: int = 1, num_layers: int = 1, mlp_ratio: float = 4.0,
                 norm_layer: type[nn.Module] | None = None, pool_type: str = "token") -> None:
        from timm.layers import Mlp  # here, not at the top: amfor.nn imports without timm (issue 25)

        super().__init__()
        if pool_type not in ("token", "avg", ""):
            raise ValueError(f"pool_type must be 'token', 'avg' or '', got {pool_type!r}")
        weights = "learned" if num_layers > 1 else "uniform"
        self.attn = QueryFusion(dim, num_heads, latent_len, num_layers, layer_weights=weights)
        self.norm = norm_layer(dim) if norm_layer is not None else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dim)
        self.pool_type, self.num_layers = pool_type, num_layers

    @classmethod
    def from_timm(cls, pool: nn.Module) -> QueryFusionPool:
        """The same computation as a timm `AttentionPoolLatent`, with its weights (and its norm and MLP modules)."""
        if getattr(pool, "pos_embed", None) is not None or not isinstance(pool.q_norm, nn.Identity):
            raise ValueError("only AttentionPoolLatent without pos_embed and qk_norm can be converted")
        if not isinstance(pool.q, nn.Linear) or pool.mlp is None:
            raise ValueError("the pool needs its q projection and its MLP (q_proj=True, out_features > 0)")
        D = pool.kv.in_features
        if pool.latent.shape[-1] != D:
            raise ValueError(f"latent_dim {pool.latent.shape[-1]} differs from the token width {D}")
        new = cls(D, pool.num_heads, pool.latent_len, pool_type=pool.pool)
        new.norm, new.mlp = pool.norm, pool.mlp
        attn = new.attn
        with torch.no_grad():
            attn.query.copy_(pool.latent[0])
            attn.q_proj.weight.copy_(pool.q.weight)
            _copy_bias(attn.q_proj, pool.q.bias)
            attn.k_proj.weight.copy_(pool.kv.weight[:D])
            attn.v_proj.weight.copy_(pool.kv.weight[D:])
            _copy_bias(attn.v_proj, pool.kv.bias[D:] if pool.kv.bias is not None else None)
            attn.proj.weight.copy_(pool.proj.weight)
            _copy_bias(attn.proj, pool.proj.bias)
        return new.to(pool.latent.dtype)

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        out = self.attn(x)  # [B, Q, D]
        out = out + self.mlp(self.norm(out))
        if self.pool_type == "token":
            return out[:, 0]
        return out.mean(1) if self.pool_type == "avg" else out


def _copy_bias(linear: nn.Linear, bias: torch.Tensor | None) -> None:
    if bias is None:
        linear.bias.zero_()
    else:
        linear.bias.copy_(bias)


class _MultiLayerPool(nn.Module):
    """Pools the outputs of the ViT blocks `layers` (negative = from the end), the final norm applied to each, from
    `first_token` on (timm pools the patch tokens only unless `pool_include_prefix`)."""

    def __init__(self, pool: QueryFusionPool, layers: Sequence[int], num_blocks: int, norm: nn.Module,
                 first_token: int) -> None:
        super().__init__()
        self.pool, self.norm, self.first_token = pool, norm, first_token
        self.layers = tuple(k % num_blocks for k in layers)

    def forward(self, intermediates: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.pool([self.norm(intermediates[k])[:, self.first_token:] for k in self.layers])


def apply_query_fusion_pool(vit: nn.Module, layers: Sequence[int] | None = None,
                            num_heads: int | None = None) -> nn.Module:
    """Give a ViT our pooling. layers=None: a drop-in for a timm ViT's `attn_pool` (`global_pool="map"`; same
    output); layers=(-3, -2, -1) etc.: `vit.forward_features` is unchanged and `query_fusion_features(vit, x)`
    pools the tokens of those blocks at once, from the attn_pool's weights when the model has one, otherwise a new
    pool (one learned query, `num_heads` heads: default the blocks' own) on any ViT `describe_vit` reads
    (TransReID, PASS, HAP, CLIP's visual ViT, amfor's ReIDViT). The pool reads the patch tokens after the final norm.
    """
    from amfor.nn.vit_adapter import describe_vit

    if getattr(vit, "attn_pool", None) is None:
        if layers is None:
            raise TypeError(f"{type(vit).__name__} has no attn_pool: build the timm ViT with global_pool='map', or "
                            f"pass layers=(...) to pool the tokens of its blocks with a new pool")
        parts = describe_vit(vit)
        heads = num_heads or parts.num_heads or 1
        multi = QueryFusionPool(parts.embed_dim, heads, 1, len(layers), norm_layer=nn.LayerNorm)
        vit.query_fusion_pool = _MultiLayerPool(multi, layers, len(parts.blocks), parts.norm, parts.num_prefix_tokens)
        return vit
    pool = vit.attn_pool if isinstance(vit.attn_pool, QueryFusionPool) else QueryFusionPool.from_timm(vit.attn_pool)
    if layers is None:
        vit.attn_pool = pool
        return vit
    multi = QueryFusionPool(pool.attn.dim, pool.attn.num_heads, pool.attn.num_queries, len(layers),
                            pool_type=pool.pool_type)
    multi.load_state_dict({k: v for k, v in pool.state_dict().items() if "layer_logits" not in k}, strict=False)
    multi.norm, multi.mlp = pool.norm, pool.mlp
    first = 0 if getattr(vit, "pool_include_prefix", False) else vit.num_prefix_tokens  # as timm's pool()
    vit.query_fusion_pool = _MultiLayerPool(multi, layers, len(vit.blocks), vit.norm, first)
    return vit


def query_fusion_features(vit: nn.Module, images: torch.Tensor, *, camera_id: torch.Tensor | None = None,
                          view_id: torch.Tensor | None = None, cv_emb: torch.Tensor | None = None) -> torch.Tensor:
    """Pooled feature [B, D] of a ViT patched with `apply_query_fusion_pool(vit, layers=...)`: the model's own
    embedding (side information from camera_id / view_id, or CLIP-ReID's cv_emb; patch dropout in training as in
    its forward) and blocks, each pooled block's tokens normalised by the final norm."""
    from amfor.nn.vit_adapter import describe_vit, uses_timm_forward

    if not hasattr(vit, "query_fusion_pool"):
        raise TypeError("call apply_query_fusion_pool(vit, layers=...) first")
    if uses_timm_forward(vit):
        x = vit._pos_embed(vit.patch_embed(images))
        x = vit.norm_pre(vit.patch_drop(x))
        outs = []
        for blk in vit.blocks:
            x = blk(x)
            outs.append(x)
        return vit.query_fusion_pool(outs)
    parts = describe_vit(vit)
    x = parts.embed(images, camera_id=camera_id, view_id=view_id, cv_emb=cv_emb, drop_patches=True)
    return vit.query_fusion_pool(parts.forward_blocks(x, every=True))
