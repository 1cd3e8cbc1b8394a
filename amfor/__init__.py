"""amfor: AMFOR occluded person re-identification, a ReID toolkit, and fused kernels for ViT ReID models."""

__version__ = "0.1.0"
