"""Drop-in fused ops for ViT ReID models, each with a pure-PyTorch reference (see amfor/ops/_backend.py).

    from amfor.ops import masked_gather, use_backend
    with use_backend("torch"):          # or AMFOR_BACKEND=torch
        kept = masked_gather(x, index, pos_embed)
"""

from amfor.ops._backend import (
    BACKENDS,
    available_backends,
    current_backend,
    use_backend,
    warn_once_if_extension_missing,
)
from amfor.ops.distill_loss import distill_kl_loss
from amfor.ops.masked_patches import masked_gather, masked_scatter, random_masking
from amfor.ops.query_fusion import query_fusion_attention

warn_once_if_extension_missing()

__all__ = [
    "BACKENDS",
    "available_backends",
    "current_backend",
    "distill_kl_loss",
    "masked_gather",
    "masked_scatter",
    "query_fusion_attention",
    "random_masking",
    "use_backend",
]
