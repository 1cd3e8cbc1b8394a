"""QueryFusion: a few queries attend over the tokens of several layers, mixed with adaptive layer weights.

The module is multi-head cross-attention (query/key/value/output projections, as nn.MultiheadAttention)
whose keys and values are the raw tokens of L layers, `[B, L, N, D]` or a list of L tensors `[B, N, D]`
(nothing is stacked), with per-layer softmax and a weighted sum over layers (amfor.ops.query_fusion_attention).
AMFOR's AMFF-Encoder (learnable queries over several layers) and its part decoder (L = 1, queries passed in,
teacher pass with an attention mask) are both this module.

Two exact ways to compute it (`path`):
- "projected": project every token to keys and values (x W_k, x W_v), attend per head (head dim D / H).
- "absorbed": since Q << N, fold the projections into the queries and the output instead:
  scores  q_h . (x_n W_kh^T + b_kh) = (q_h W_kh) . x_n + const   (the key bias cancels in the softmax)
  output  sum_n p_n (x_n W_vh^T + b_vh) = (sum_n p_n x_n) W_vh^T + (sum_n p_n) b_vh
  so every head attends over the raw tokens once (keys = values = x, shared by all heads, head dim D)
  and the value projection is applied to H * Q pooled tokens rather than to L * N tokens. sum_n p_n is 1,
  or 0 for a layer whose keys are all masked for that query: the value bias is added exactly so.
`path="auto"` picks the cheaper by `query_fusion_costs` (multiply-accumulates; see docs/query_fusion.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from amfor.ops.query_fusion import query_fusion_attention

PATHS = ("auto", "absorbed", "projected")
LAYER_WEIGHTS = ("learned", "uniform", "input")


def query_fusion_costs(batch: int, num_queries: int, num_layers: int, num_tokens: int, dim: int, num_heads: int,
                       per_sample_queries: bool = False) -> dict[str, int]:
    """Multiply-accumulates of the two paths (terms both paths share, the query and output projections, left out).

    projected = 2 B L N D^2 (keys and values of every token) + 2 B Q L N D (attention, H heads of D / H)
    absorbed  = Sq Q D^2 (q_h W_kh for every head) + 2 B H Q L N D (attention, H heads of D over raw tokens)
                + B Q D^2 (W_v on the H pooled tokens of each query), Sq = B for per-sample queries, else 1.
    Absorbed wins roughly when Q (H - 1) < D: for ViT-B (D = 768, H = 12) up to about 69 queries.
    """
    B, Q, L, N, D, H = batch, num_queries, num_layers, num_tokens, dim, num_heads
    sq = B if per_sample_queries else 1
    projected = 2 * B * L * N * D * D + 2 * B * Q * L * N * D
    absorbed = sq * Q * D * D + 2 * B * H * Q * L * N * D + B * Q * D * D
    return {"projected": projected, "absorbed": absorbed}


def choose_path(batch: int, num_queries: int, num_layers: int, num_tokens: int, dim: int, num_heads: int,
                per_sample_queries: bool = False) -> str:
    """'absorbed' when its multiply-accumulates do not exceed the projected path's, else 'projected'."""
    cost = query_fusion_costs(batch, num_queries, num_layers, num_tokens, dim, num_heads, per_sample_queries)
    return "absorbed" if cost["absorbed"] <= cost["projected"] else "projected"


class QueryFusion(nn.Module):
    """Multi-head attention of Q queries over the tokens of L layers, the layers mixed by adaptive weights.

    dim: token width D; num_heads: H (divides D); num_queries: Q learnable queries (used when forward gets
    no `queries`; 0 = always pass them); num_layers: L.
    bias: biases of the query, value and output projections (the key projection has none: a key bias shifts
    every score of a query by the same q . b_k, which the softmax cancels, so it could never learn);
    layer_weights: "learned" (softmax of learned logits, starting uniform), "uniform" (1/L) or "input" (forward
    must get them); path: "auto" | "absorbed" | "projected".
    """

    def __init__(self, dim: int, num_heads: int, num_queries: int, num_layers: int, *, bias: bool = True,
                 layer_weights: str = "learned", path: str = "auto", query_std: float = 0.02) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        if layer_weights not in LAYER_WEIGHTS:
            raise ValueError(f"layer_weights must be one of {LAYER_WEIGHTS}, got {layer_weights!r}")
        if num_layers < 1 or num_queries < 0:
            raise ValueError(f"need num_layers >= 1 and num_queries >= 0, got {num_layers}, {num_queries}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.num_queries, self.num_layers, self.path = num_queries, num_layers, path
        self.layer_weights_mode = layer_weights
        self.query = nn.Parameter(torch.randn(num_queries, dim) * query_std) if num_queries > 0 else None
        self.layer_logits = nn.Parameter(torch.zeros(num_layers)) if layer_weights == "learned" else None
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=False)  # a key bias adds q . b_k to all of a query's scores: it cancels
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_queries={self.num_queries}, "
                f"num_layers={self.num_layers}, layer_weights={self.layer_weights_mode!r}, path={self.path!r}")

    # -- inputs ------------------------------------------------------------------------------------------
    def _layers(self, x: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor | list[torch.Tensor], int, int]:
        """x: [B, L, N, D], [B, N, D] (L = 1) or L x [B, N, D]  ->  (x as given / as a list, B, N)."""
        if isinstance(x, torch.Tensor):
            x = x[:, None] if x.dim() == 3 else x
            if x.dim() != 4 or x.shape[1] != self.num_layers or x.shape[3] != self.dim:
                raise ValueError(f"x must be [B, L={self.num_layers}, N, D={self.dim}], got {list(x.shape)}")
            return x, x.shape[0], x.shape[2]
        layers = list(x)
        if len(layers) != self.num_layers or any(t.dim() != 3 or t.shape[-1] != self.dim for t in layers):
            raise ValueError(f"x must be a list of L={self.num_layers} tensors [B, N, D={self.dim}], got "
                             f"{[list(t.shape) for t in layers]}")
        return layers, layers[0].shape[0], layers[0].shape[1]

    def _queries(self, queries: torch.Tensor | None) -> torch.Tensor:
        """[Q, D] (shared) or [B, Q, D] (per sample) -> [Bq, Q, D]."""
        if queries is None:
            if self.query is None:
                raise ValueError("this QueryFusion has no learnable queries (num_queries=0): pass `queries`")
            queries = self.query
        if queries.dim() not in (2, 3) or queries.shape[-1] != self.dim:
            raise ValueError(f"queries must be [Q, D] or [B, Q, D] with D = {self.dim}, got {list(queries.shape)}")
        return queries if queries.dim() == 3 else queries[None]

    def _layer_weights(self, layer_weights: torch.Tensor | None) -> torch.Tensor | None:
        if layer_weights is not None:
            return layer_weights
        if self.layer_weights_mode == "input":
            raise ValueError("layer_weights='input': forward needs layer_weights ([L], [B, L] or [B, Q, L])")
        if self.layer_logits is None:
            return None
        return torch.softmax(self.layer_logits.to(torch.promote_types(self.layer_logits.dtype, torch.float32)), 0)

    def choose_path(self, batch: int, num_queries: int, num_tokens: int, per_sample_queries: bool) -> str:
        """The path forward takes for these sizes (the forced one, or the cost model's choice)."""
        if self.path != "auto":
            return self.path
        return choose_path(batch, num_queries, self.num_layers, num_tokens, self.dim, self.num_heads,
                           per_sample_queries)

    # -- forward -----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor | Sequence[torch.Tensor], queries: torch.Tensor | None = None,
                layer_weights: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                path: str | None = None) -> torch.Tensor:
        """x: [B, L, N, D] or L x [B, N, D]; queries: None (the learned ones), [Q, D] or [B, Q, D];
        layer_weights: None (the module's), [L], [B, L] or [B, Q, L]; attn_mask: bool [B, Q or 1, L, N],
        True = may attend; path: overrides the module's  ->  [B, Q, D]."""
        x, B, N = self._layers(x)
        q = self._queries(queries)
        if q.shape[0] not in (1, B):
            raise ValueError(f"queries batch {q.shape[0]} differs from x batch {B}")
        w = self._layer_weights(layer_weights)
        chosen = path if path is not None else self.choose_path(B, q.shape[1], N, q.shape[0] > 1)
        if chosen not in PATHS[1:]:
            raise ValueError(f"path must be 'absorbed' or 'projected', got {chosen!r}")
        fused = (self._forward_absorbed if chosen == "absorbed" else self._forward_projected)(x, q, B, w, attn_mask)
        return self.proj(fused)

    def _forward_projected(self, x, q: torch.Tensor, B: int, w, attn_mask) -> torch.Tensor:
        """Keys and values of every token, H heads of D / H: the textbook computation.  -> [B, Q, D]"""
        H, dh = self.num_heads, self.head_dim
        Q = q.shape[1]
        qh = self.q_proj(q).view(-1, Q, H, dh).transpose(1, 2).expand(B, H, Q, dh)

        def heads(t: torch.Tensor) -> torch.Tensor:  # [B, (L,) N, D] -> [B, H, (L,) N, dh], a view
            return t.unflatten(-1, (H, dh)).movedim(-2, 1)

        if isinstance(x, torch.Tensor):
            k, v = heads(self.k_proj(x)), heads(self.v_proj(x))
        else:
            k, v = [heads(self.k_proj(t)) for t in x], [heads(self.v_proj(t)) for t in x]
        out = query_fusion_attention(qh, k, v, w, attn_mask, scale=dh ** -0.5)  # [B, H, Q, dh]
        return out.transpose(1, 2).reshape(B, Q, self.dim)

    def _forward_absorbed(self, x, q: torch.Tensor, B: int, w, attn_mask) -> torch.Tensor:
        """W_k folded into the queries, W_v applied to the pooled raw tokens: keys = values = x.  -> [B, Q, D]"""
        H, dh, D = self.num_heads, self.head_dim, self.dim
        Q = q.shape[1]
        qh = self.q_proj(q).view(-1, Q, H, dh)
        qa = torch.einsum("bqhe,hed->bhqd", qh, self.k_proj.weight.view(H, dh, D)).expand(B, H, Q, D)
        kv = x[:, None] if isinstance(x, torch.Tensor) else [t[:, None] for t in x]  # one key/value head
        pooled = query_fusion_attention(qa, kv, kv, w, attn_mask, scale=dh ** -0.5)  # [B, H, Q, D]
        out = torch.einsum("bhqd,hed->bqhe", pooled, self.v_proj.weight.view(H, dh, D))  # [B, Q, H, dh]
        if self.v_proj.bias is not None:
            out = out + self._prob_mass(w, attn_mask, B, Q, out.dtype)[:, :, None, None] * self.v_proj.bias.view(H, dh)
        return out.reshape(B, Q, D)

    def _prob_mass(self, w, attn_mask, B: int, Q: int, dtype: torch.dtype) -> torch.Tensor:
        """[B, Q]: sum_l w[b, q, l] * sum_n p_n, the sum being 1, or 0 where the layer is fully masked."""
        from amfor.ops.query_fusion import broadcast_layer_weights

        acc = torch.promote_types(dtype, torch.float32)
        weights = broadcast_layer_weights(w, B, Q, self.num_layers, acc, self.proj.weight.device)
        if attn_mask is not None:
            weights = weights * attn_mask.any(-1).expand(B, Q, self.num_layers)
        return weights.sum(-1).to(dtype)
