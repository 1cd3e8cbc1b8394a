"""nn.Module wrappers over amfor.ops, and helpers that patch a timm ViT."""

from amfor.nn.patch_dropout import PatchDropout, apply_patch_dropout

__all__ = ["PatchDropout", "apply_patch_dropout"]
