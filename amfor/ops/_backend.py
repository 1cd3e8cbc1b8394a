"""Which implementation of an op runs: auto | torch | triton | cuda | cpp.

The choice comes from `use_backend(name)` (a context manager) or the environment variable `AMFOR_BACKEND`,
`auto` by default. `auto` takes, for the input's device, the first available implementation in the op's
measured order of preference (its `AUTO_ORDER`); the PyTorch reference always runs.

- `torch`:  the pure-PyTorch reference in amfor/ops/<op>.py; every device.
- `cpp`:    `torch.ops.amfor.<op>` from the compiled extension `amfor._C`, on CPU tensors.
- `cuda`:   `torch.ops.amfor.<op>` from `amfor._C` built with CUDA, on CUDA tensors.
- `triton`: `amfor.kernels.<op>` on CUDA tensors, or on CPU under the Triton interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence

import torch

BACKENDS = ("auto", "torch", "triton", "cuda", "cpp")
_state = threading.local()


def _load_extension() -> tuple[bool, str, bool]:
    """(loaded, reason, has_cuda): importing `amfor._C` registers the `torch.ops.amfor.*` kernels."""
    try:
        importlib.import_module("amfor._C")
    except Exception as exc:  # noqa: BLE001 - any failure to load means: fall back to the reference
        why = (f"amfor._C failed to load ({type(exc).__name__}: {exc}); "
               "reinstall with `pip install -e . --no-build-isolation`")
        return False, why, False
    return True, "loaded", torch._C._dispatch_has_kernel_for_dispatch_key("amfor::masked_gather", "CUDA")


def _probe_triton() -> tuple[bool, str]:
    """(importable, reason) for Triton; the kernels import it when they first run."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    return True, "importable"


# Probed once at import, so that the choice below is plain Python that torch.compile traces as constants.
_EXTENSION = _load_extension()
_TRITON = _probe_triton()


def extension_status() -> tuple[bool, str]:
    """(loaded, reason) of the compiled extension `amfor._C`."""
    return _EXTENSION[0], _EXTENSION[1]


def extension_has_cuda() -> bool:
    """Whether the loaded extension registered CUDA kernels (it was built with nvcc)."""
    return _EXTENSION[2]


def triton_status() -> tuple[bool, str]:
    """(importable, reason) for Triton."""
    return _TRITON


def triton_interpreted() -> bool:
    """Whether Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reasons(device: torch.device | str) -> dict[str, str]:
    """Backends that cannot run on `device`, each with the reason."""
    device = torch.device(device)
    reasons: dict[str, str] = {}
    ext_ok, ext_why = extension_status()
    triton_ok, triton_why = triton_status()
    if device.type == "cuda":
        reasons["cpp"] = "cpp runs on CPU tensors only"
        if not ext_ok:
            reasons["cuda"] = ext_why
        elif not extension_has_cuda():
            reasons["cuda"] = "amfor._C was built without CUDA (no nvcc or a CPU build of torch at install time)"
        if not triton_ok:
            reasons["triton"] = triton_why
    else:
        reasons["cuda"] = f"cuda needs CUDA tensors, got a {device.type} tensor"
        if device.type != "cpu":
            reasons["cpp"] = f"cpp runs on CPU tensors, got {device.type}"
        elif not ext_ok:
            reasons["cpp"] = ext_why
        if not triton_ok:
            reasons["triton"] = triton_why
        elif not (device.type == "cpu" and triton_interpreted()):
            reasons["triton"] = "triton runs on CPU tensors only under the interpreter (set TRITON_INTERPRET=1)"
    return reasons


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The concrete backends that can run on `device`, `torch` always among them."""
    missing = unavailable_reasons(device)
    return [b for b in BACKENDS[1:] if b not in missing]


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown amfor backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def current_backend() -> str:
    """The selected backend name: the innermost `use_backend`, else AMFOR_BACKEND, else 'auto'."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    return _check_name(os.environ.get("AMFOR_BACKEND", "auto").strip().lower() or "auto")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run the amfor ops inside the block with backend `name` (auto | torch | triton | cuda | cpp)."""
    stack = _state.__dict__.setdefault("stack", [])
    stack.append(_check_name(name))
    try:
        yield name
    finally:
        stack.pop()


@torch.compiler.assume_constant_result
def resolve(op: str, device: torch.device, auto_order: Mapping[str, Sequence[str]],
            dtype: torch.dtype | None = None) -> str:
    """The concrete backend for `op` on `device`; a clear error when a forced one cannot run there.

    auto_order maps a device type ("cpu", "cuda"), or a device type and dtype ("cpu:float32"), which takes
    precedence for that dtype, to the op's implementations from fastest to slowest, as measured.
    Under torch.compile the choice is made once, at trace time.
    """
    name = current_backend()
    missing = unavailable_reasons(device)
    if name == "auto":
        order = auto_order.get(device.type, ())
        if dtype is not None:
            order = auto_order.get(f"{device.type}:{str(dtype).removeprefix('torch.')}", order)
        for candidate in order:
            if candidate not in missing:
                return candidate
        return "torch"
    if name in missing:
        raise RuntimeError(f"amfor backend {name!r} cannot run {op} on {device}: {missing[name]}")
    return name


def op(qualname: str):
    """The callable of a registered op, e.g. op("amfor::masked_gather") is torch.ops.amfor.masked_gather."""
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name)


def warn_once_if_extension_missing() -> None:
    """Say once, at import, which compiled backends are missing and why."""
    ok, why = extension_status()
    if not ok:
        warnings.warn(f"amfor: the cpp and cuda backends are unavailable, the reference runs instead: {why}",
                      RuntimeWarning, stacklevel=3)
