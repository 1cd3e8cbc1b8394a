"""amfor: AMFOR occluded person re-identification, a ReID toolkit, and fused kernels for ViT ReID models."""

__version__ = "0.1.0"

from amfor.models import create_model, list_models  # noqa: E402

__all__ = ["create_model", "list_models"]
