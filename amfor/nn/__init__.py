"""nn.Module wrappers over amfor.ops, and helpers that patch a timm ViT."""

from amfor.nn.attention_pool import QueryFusionPool, apply_query_fusion_pool, query_fusion_features
from amfor.nn.masked_vit import MAEDecoder, masked_forward_features
from amfor.nn.patch_dropout import PatchDropout, apply_patch_dropout
from amfor.nn.query_fusion import QueryFusion

__all__ = ["MAEDecoder", "PatchDropout", "QueryFusion", "QueryFusionPool", "apply_patch_dropout",
           "apply_query_fusion_pool", "masked_forward_features", "query_fusion_features"]
