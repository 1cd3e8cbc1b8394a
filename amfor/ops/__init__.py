"""Drop-in fused ops for ViT ReID models, each with a pure-PyTorch reference (see amfor/ops/_registry.py).

    from amfor.ops import masked_gather, use_backend
    with use_backend("torch"):          # or AMFOR_BACKEND=torch
        kept = masked_gather(x, index, pos_embed)

Backend queries (for evaluation, benchmarks and tests; nothing outside amfor/ops imports _backend):
`available_backends(device, op=None)`, `unavailable_reasons(device, op=None)`, `backend_for(op, device, dtype)`,
`extension_status()`, `extension_has_cuda()`, `has_kernel(op, device_type)`, `triton_status()`,
`triton_interpreted()`, `current_backend()`, `use_backend(name)`, `BACKENDS`.
"""

from amfor.ops._backend import (
    BACKENDS,
    current_backend,
    extension_has_cuda,
    extension_status,
    has_kernel,
    triton_interpreted,
    triton_status,
    use_backend,
    warn_once_if_extension_missing,
)
from amfor.ops._registry import available_backends, backend_for, unavailable_reasons
from amfor.ops.distill_loss import distill_kl_loss
from amfor.ops.masked_patches import masked_gather, masked_scatter, random_masking
from amfor.ops.query_fusion import query_fusion_attention
from amfor.ops.rank_metrics import rank_metrics

warn_once_if_extension_missing()

__all__ = [
    "BACKENDS",
    "available_backends",
    "backend_for",
    "current_backend",
    "distill_kl_loss",
    "extension_has_cuda",
    "extension_status",
    "has_kernel",
    "masked_gather",
    "masked_scatter",
    "query_fusion_attention",
    "random_masking",
    "rank_metrics",
    "triton_interpreted",
    "triton_status",
    "unavailable_reasons",
    "use_backend",
]
