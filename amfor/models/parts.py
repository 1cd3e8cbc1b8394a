"""Parts (docs/spec.md section 4, after TSD): pixel-to-part classifier, weighted pooling, visibility head, and the
part decoder run as student (no attention mask) and as teacher (attention restricted by sampled part masks).

Part decoder queries: [CLS of the memory M (detached), background, P parts] = P + 2 queries, shared learned
embeddings for all but the first. Teacher masks: the CLS query may attend where a Bernoulli draw of the
foreground probability (1 - p_background) says so, the background and part queries where a draw of their own
part's probability does; every query keeps at least its most probable token. Both passes run as one
cross-attention call (2 (P + 2) queries per image, an attention mask), so the keys and values of the memory are
computed once. The cross-attention keeps QueryFusion's weights (L = 1: plain multi-head attention) and runs as
torch's fused `scaled_dot_product_attention` on the projected keys and values (`single_layer_attention`,
attention.py; docs/model.md, "Training-step cost").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from amfor.models.attention import single_layer_attention
from amfor.nn import QueryFusion


class PartClassifier(nn.Module):
    """Pixel-to-part classifier: BN + Linear(D -> 1 + P) over patch tokens [B, N, D] -> logits [B, N, 1 + P]."""

    def __init__(self, dim: int, num_parts: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        self.fc = nn.Linear(dim, num_parts + 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, N, D = tokens.shape
        return self.fc(self.bn(tokens.reshape(B * N, D))).view(B, N, -1)


def weighted_pooling(tokens: torch.Tensor, probs: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Global weighted pooling: tokens [B, N, D], probs [B, N, 1 + P] (column 0 background)
    -> (parts [B, P, D] with f_p = sum_n m_np x_n / max(sum_n m_np, eps), foreground [B, D] with m = sum_p m_np)."""
    m = probs[..., 1:].to(tokens.dtype)  # [B, N, P]
    parts = torch.einsum("bnp,bnd->bpd", m, tokens) / m.sum(1).clamp(min=eps)[..., None]
    fg = m.sum(-1)  # [B, N]
    foreground = torch.einsum("bn,bnd->bd", fg, tokens) / fg.sum(1).clamp(min=eps)[:, None]
    return parts, foreground


class VisibilityHead(nn.Module):
    """BN + Linear(D -> 1) per part: parts [B, P, D] -> visibility logits [B, P]."""

    def __init__(self, num_parts: int, dim: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(num_parts * dim)
        self.weight = nn.Parameter(torch.randn(num_parts, dim) * 0.01)
        self.bias = nn.Parameter(torch.zeros(num_parts))

    def forward(self, parts: torch.Tensor) -> torch.Tensor:
        B, P, D = parts.shape
        x = self.bn(parts.reshape(B, P * D)).view(B, P, D)
        return (x * self.weight).sum(-1) + self.bias


def teacher_masks(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Attention masks of the teacher's queries from part probabilities.

    probs: [B, N, 1 + P] (detached) -> bool [B, P + 2, N]: row 0 (CLS) ~ Bernoulli(1 - p_bg), row 1 (background)
    ~ Bernoulli(p_bg), row 1 + j ~ Bernoulli(p_j); each row also keeps its most probable token.
    """
    p = probs.detach().float()
    rows = torch.cat([1.0 - p[..., :1], p], dim=-1).transpose(1, 2)  # [B, P + 2, N]
    mask = torch.bernoulli(rows, generator=generator).bool()
    best = F.one_hot(rows.argmax(-1), rows.shape[-1]).bool()
    return mask | best


class PartDecoderLayer(nn.Module):
    """Self-attention (residual) -> LN -> cross-attention over the memory (residual) -> LN -> FFN (residual) -> LN."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = QueryFusion(dim, num_heads, num_queries=0, num_layers=1, layer_weights="uniform")
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Linear(ffn_dim, dim))
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, q: torch.Tensor, memory: torch.Tensor, passes: int, attn_mask: torch.Tensor | None,
                shared: bool = False) -> torch.Tensor:
        """q: [B, passes * Q, D] (the passes side by side), or with `shared` [B, Q, D]: one query set that every pass
        starts from (the first layer, whose passes differ only in their attention masks: the self-attention, which
        the mask does not touch, runs once); memory: [B, N, D] (normalised); attn_mask: bool [B, passes * Q, 1, N]
        or None  ->  [B, passes * Q, D]."""
        B, _, D = q.shape
        s = q if shared else q.reshape(B * passes, -1, D)  # the passes do not attend to each other
        s = self.norm1(s + self.self_attn(s, s, s, need_weights=False)[0]).reshape(B, -1, D)
        if shared and passes > 1:
            s = s.repeat(1, passes, 1)
        q = self.norm2(s + self.cross_attention(memory, s, attn_mask))
        return self.norm3(q + self.ffn(q))

    def cross_attention(self, memory: torch.Tensor, q: torch.Tensor, attn_mask: torch.Tensor | None
                        ) -> torch.Tensor:
        """`cross_attn` over memory [B, N, D] for q [B, Q, D], attn_mask bool [B, Q, 1, N] or None  ->  [B, Q, D]
        (`single_layer_attention`: torch's fused attention on the module's projections)."""
        return single_layer_attention(self.cross_attn, memory, q, attn_mask)


class PartDecoder(nn.Module):
    """TSD's part decoder: queries [CLS(M) detached, background, P parts] over LN(M's patch tokens).

    forward(memory [B, 1 + N, D], teacher_mask bool [B, P + 2, N] or None) -> student [B, P + 2, D] and, when a
    mask is given, teacher [B, P + 2, D] from the same call.
    """

    def __init__(self, dim: int, num_parts: int, num_heads: int = 8, ffn_dim: int = 3072, depth: int = 1) -> None:
        super().__init__()
        self.num_queries = num_parts + 2
        self.query_embed = nn.Parameter(torch.randn(num_parts + 1, dim) * 0.02)
        self.memory_norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(PartDecoderLayer(dim, num_heads, ffn_dim) for _ in range(depth))

    def forward(self, memory: torch.Tensor, teacher_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B = memory.shape[0]
        q = torch.cat([memory[:, :1].detach(), self.query_embed.expand(B, -1, -1)], dim=1)  # [B, P + 2, D]
        passes, mask = 1, None
        if teacher_mask is not None:  # student and teacher start from the same queries: the first layer shares them
            passes = 2
            mask = torch.cat([torch.ones_like(teacher_mask), teacher_mask], dim=1)[:, :, None]  # [B, 2Q, 1, N]
        tokens = self.memory_norm(memory[:, 1:])
        for i, layer in enumerate(self.layers):
            q = layer(q, tokens, passes, mask, shared=i == 0)
        if teacher_mask is None:
            return q, None
        return q[:, : self.num_queries], q[:, self.num_queries:]
