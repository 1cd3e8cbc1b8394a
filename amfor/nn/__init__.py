"""nn.Module wrappers over amfor.ops, and helpers that patch a ViT (timm, TransReID, PASS, HAP, CLIP: vit_adapter)."""

from amfor.nn.attention_pool import QueryFusionPool, apply_query_fusion_pool, query_fusion_features
from amfor.nn.masked_vit import MAEDecoder, masked_forward_features
from amfor.nn.patch_dropout import PatchDropout, apply_patch_dropout
from amfor.nn.query_fusion import QueryFusion
from amfor.nn.vit_adapter import ViTLayoutError, ViTParts, describe_vit

__all__ = ["MAEDecoder", "PatchDropout", "QueryFusion", "QueryFusionPool", "ViTLayoutError", "ViTParts",
           "apply_patch_dropout", "apply_query_fusion_pool", "describe_vit", "masked_forward_features",
           "query_fusion_features"]
