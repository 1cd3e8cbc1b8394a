"""amfor: AMFOR occluded person re-identification, a ReID toolkit, and fused kernels for ViT ReID models.

`import amfor` is light: the ops (`amfor.ops`, `amfor.nn`, `amfor.testing`) need only torch and Triton, so that a
machine without the model stack's packages (open_clip, omegaconf, timm) can still run the op tests and benchmarks.
`amfor.create_model` and `amfor.list_models` import the models (and those packages) on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["create_model", "list_models"]

_LAZY = {"create_model": "amfor.models", "list_models": "amfor.models", "Extractor": "amfor.deploy.extractor"}
# `amfor.models.X` after `import amfor` keeps working, as it did when this file imported the models
_SUBPACKAGES = ("data", "deploy", "engine", "evaluation", "losses", "models", "nn", "ops", "utils")


def __getattr__(name: str):
    """`amfor.create_model` / `amfor.list_models` (from amfor.models) and the subpackages, imported when first
    asked for."""
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"amfor.{name}")
    else:
        raise AttributeError(f"module 'amfor' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
