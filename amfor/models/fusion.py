"""AMFF-Encoder: adaptive multi-granularity feature fusion (docs/spec.md section 3), on amfor.nn.QueryFusion.

At fusion point k (after backbone block k, layers x_0 .. x_k, L = k + 1):
1. learnable queries E_k [L, D];
2. text step: E' = E_k + MHA(E_k, T, T) over the text bank T [C, D] (skipped without text). T is the same for
   every image, so E' is computed once per batch, not per image (torch's fused attention on the one-layer
   QueryFusion's projections: `single_layer_attention`);
3. multi-granularity step: E'' = LN(QueryFusion(E', x_0 .. x_k)): the queries attend over every token of the
   L layers (per-layer softmax, mixed by learned layer weights: the fused query-fusion op) or, with
   `tokens="cls"`, over the L CLS tokens only; an MLP D -> 4D -> D gives per-layer channel weights w [B, L, D],
   normalised over the layers (softmax, so the mix is convex) or squashed each (sigmoid);
4. x'_k = sigmoid(a_k) * sum_i w_i * x_i + (1 - sigmoid(a_k)) * x_k, a_k a learned gate starting at -2 so that
   training begins close to the plain ViT (computed as one multiply-add per layer, the gate folded into the
   weights).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import Mlp
from torch import nn

from amfor.models.attention import single_layer_attention
from amfor.nn import QueryFusion

TOKENS = ("all", "cls")
WEIGHTINGS = ("softmax", "sigmoid")


class FusionPoint(nn.Module):
    """The AMFF step after one block: [x_0 .. x_k] -> x'_k.

    dim: D; num_layers: L = k + 1; num_heads: heads of both attentions; tokens: "all" | "cls";
    weighting: "softmax" | "sigmoid" over the layer axis; gate_init: a_k at start; text: whether a text bank is used.
    """

    def __init__(self, dim: int, num_layers: int, num_heads: int, *, tokens: str = "all", weighting: str = "softmax",
                 gate_init: float = -2.0, text: bool = True, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if tokens not in TOKENS or weighting not in WEIGHTINGS:
            raise ValueError(f"tokens must be one of {TOKENS} and weighting one of {WEIGHTINGS}, got "
                             f"{tokens!r}, {weighting!r}")
        self.num_layers, self.tokens, self.weighting = num_layers, tokens, weighting
        self.queries = nn.Parameter(torch.randn(num_layers, dim) * 0.02)
        attn_layers = num_layers if tokens == "all" else 1
        self.text_attn = QueryFusion(dim, num_heads, 0, 1, layer_weights="uniform") if text else None
        self.layer_attn = QueryFusion(dim, num_heads, 0, attn_layers,
                                      layer_weights="learned" if attn_layers > 1 else "uniform")
        self.norm = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dim)
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, tokens={self.tokens!r}, weighting={self.weighting!r}"

    def text_queries(self, text_bank: torch.Tensor | None) -> torch.Tensor:
        """E' [L, D]: the queries after the text step (the learned queries alone without text)."""
        if self.text_attn is None or text_bank is None:
            return self.queries
        return self.queries + single_layer_attention(self.text_attn, text_bank[None], self.queries[None])[0]

    def layer_weights(self, layers: Sequence[torch.Tensor], queries: torch.Tensor) -> torch.Tensor:
        """Channel weights w [B, L, D] of the L layers from the queries' attention over them."""
        if self.tokens == "all":
            pooled = self.layer_attn(list(layers), queries)  # [B, L, D]
        else:
            pooled = self.layer_attn(torch.stack([x[:, 0] for x in layers], 1), queries)
        w = self.mlp(self.norm(pooled))
        return w.softmax(dim=1) if self.weighting == "softmax" else torch.sigmoid(w)

    def forward(self, layers: Sequence[torch.Tensor], text_bank: torch.Tensor | None = None) -> torch.Tensor:
        """layers: L tensors [B, N, D] (x_0 .. x_k); text_bank: [C, D] or None  ->  x'_k [B, N, D]."""
        if len(layers) != self.num_layers:
            raise ValueError(f"fusion point expects {self.num_layers} layers, got {len(layers)}")
        w = self.layer_weights(layers, self.text_queries(text_bank))
        g = torch.sigmoid(self.gate)
        # the gate folded into the layer weights: c_i = g w_i, plus (1 - g) on x_k; one multiply-add per layer
        c = torch.cat([g * w[:, :-1], g * w[:, -1:] + (1.0 - g)], dim=1)[:, :, None]  # [B, L, 1, D]
        out = layers[0] * c[:, 0]
        for i in range(1, len(layers)):
            out = torch.addcmul(out, layers[i], c[:, i])
        return out


class AMFFEncoder(nn.Module):
    """The fusion points of one backbone: {k: FusionPoint(L = k + 1)} for k in `points` (1-based block numbers)."""

    def __init__(self, dim: int, num_heads: int, points: Sequence[int], num_blocks: int, **kwargs) -> None:
        super().__init__()
        points = sorted(set(int(k) for k in points))
        if any(k < 1 or k > num_blocks for k in points):
            raise ValueError(f"fusion points must lie in 1..{num_blocks} (the shared blocks), got {points}")
        self.points = tuple(points)
        self.fuse = nn.ModuleDict({str(k): FusionPoint(dim, k + 1, num_heads, **kwargs) for k in points})

    def __contains__(self, k: int) -> bool:
        return str(k) in self.fuse

    def forward(self, k: int, layers: Sequence[torch.Tensor], text_bank: torch.Tensor | None) -> torch.Tensor:
        return self.fuse[str(k)](layers, text_bank)

    def gates(self) -> torch.Tensor:
        """sigmoid(a_k) of every fusion point [K] (for logging)."""
        return torch.stack([torch.sigmoid(f.gate.detach()) for f in self.fuse.values()])
