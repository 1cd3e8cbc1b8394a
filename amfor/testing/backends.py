"""Where an op test runs: the devices, the backends that run there, and a skip (with the reason) for the rest."""

from __future__ import annotations

import torch

from amfor.ops import available_backends, unavailable_reasons


def devices() -> list[str]:
    """Devices to test on: cpu always, cuda when available."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backends(device: str, op: str | None = None) -> list[str]:
    """Concrete backends that can run on `device` (that have `op`, when given)."""
    return available_backends(device, op)


def require_backend(device: str, backend: str, op: str | None = None) -> None:
    """pytest.skip the calling test or benchmark, naming the reason, when `backend` cannot run there."""
    import pytest  # only where tests run: amfor itself does not depend on pytest

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    missing = unavailable_reasons(device, op)
    if backend in missing:
        pytest.skip(f"{backend} on {device}: {missing[backend]}")
