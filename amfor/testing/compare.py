"""How an op test compares a kernel with its reference: uninitialised memory poisoned with NaN, and the tolerance
rule for low precision (docs/design.md, "Testing tiers")."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def poisoned() -> Iterator[None]:
    """Fill uninitialised memory with NaN inside the block (deterministic mode, warnings only)."""
    was_det = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = was_fill
        torch.use_deterministic_algorithms(was_det, warn_only=was_warn)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def assert_close_lowp(actual: torch.Tensor, reference: torch.Tensor, reference_lowp: torch.Tensor | None = None,
                      *, floor: float = 1e-5, rtol: float = 1e-5, name: str = "output") -> None:
    """Compare a kernel's output with the reference by the project's tolerance rule.

    actual: kernel output in dtype T; reference: the reference in float32/float64 on the same inputs;
    reference_lowp: the reference run in dtype T (required when T is float16/bfloat16).
    """
    assert actual.shape == reference.shape, f"{name}: shape {list(actual.shape)} != {list(reference.shape)}"
    assert not torch.isnan(actual).any() or torch.isnan(reference).any(), f"{name}: NaN in the kernel output"
    if actual.dtype in LOW_PRECISION:
        assert reference_lowp is not None, "low-precision comparisons need the reference run in the same dtype"
        allowed = 2 * _max_err(reference_lowp, reference) + floor
        err = _max_err(actual, reference)
        assert err <= allowed, f"{name}: max error {err:.3g} > 2 x reference's {allowed - floor:.3g} + {floor:g}"
        return
    torch.testing.assert_close(actual.to(reference.dtype), reference, rtol=rtol, atol=floor,
                               msg=lambda m: f"{name}: {m}")
