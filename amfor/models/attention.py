"""A single-layer QueryFusion (uniform layer weights: plain multi-head cross-attention) computed with torch's fused
`scaled_dot_product_attention` on the module's own projections.

For a few queries over one layer of few tokens (the part decoder's 2 (P + 2) queries over 32 tokens, the AMFF
text step's L queries over the text bank) this runs PyTorch's CPU flash kernel and plain linear layers instead of
the query-fusion op and its autograd wrapper: the same parameters and the same result within float32 rounding
(docs/model.md, "Training-step cost").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from amfor.nn import QueryFusion


def single_layer_attention(qf: QueryFusion, memory: torch.Tensor, queries: torch.Tensor,
                           attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`qf(memory, queries, attn_mask=attn_mask)` for a QueryFusion with one layer and uniform weights.

    memory [B, N, D]; queries [B, Q, D] (or [1, Q, D] with B = 1); attn_mask bool [B, Q, 1, N] or None, every row
    keeping at least one token  ->  [B, Q, D].
    """
    if qf.num_layers != 1 or qf.layer_weights_mode != "uniform":
        raise ValueError(f"single_layer_attention needs a one-layer QueryFusion with uniform weights, got "
                         f"num_layers={qf.num_layers}, layer_weights={qf.layer_weights_mode!r}")
    B, Q, D = queries.shape
    H = qf.num_heads

    def heads(t: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, H, T, D / H]
        return t.unflatten(-1, (H, D // H)).transpose(1, 2)

    mask = None if attn_mask is None else attn_mask[:, None, :, 0]  # [B, 1, Q, N]
    out = F.scaled_dot_product_attention(heads(qf.q_proj(queries)), heads(qf.k_proj(memory)),
                                         heads(qf.v_proj(memory)), attn_mask=mask)
    return qf.proj(out.transpose(1, 2).reshape(B, Q, D))
