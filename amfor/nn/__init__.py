"""nn.Module wrappers over amfor.ops, and helpers that patch a timm ViT."""

from amfor.nn.patch_dropout import PatchDropout, apply_patch_dropout
from amfor.nn.query_fusion import QueryFusion

__all__ = ["PatchDropout", "QueryFusion", "apply_patch_dropout"]
