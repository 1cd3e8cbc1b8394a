"""Which implementation of an op runs: auto | torch | triton | cuda | cpp (the raw choice; ops go through _registry).

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


_COMPILED_OPS = ("masked_gather", "masked_scatter", "masked_gather_backward", "query_fusion_attention",
                 "query_fusion_attention_backward", "distill_kl_loss", "rank_metrics")
_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}


def _load_extension() -> tuple[bool, str, dict[str, frozenset[str]]]:
    """(loaded, reason, {op: device types with a kernel}): importing `amfor._C` registers the kernels."""
    try:
        importlib.import_module("amfor._C")
    except Exception as exc:  # noqa: BLE001 - any failure to load means: fall back to the reference
        why = (f"amfor._C failed to load ({type(exc).__name__}: {exc}); "
               "reinstall with `pip install -e . --no-build-isolation`")
        return False, why, {}
    kernels = {}
    for name in _COMPILED_OPS:
        qualname = f"amfor::{name}"
        present = _has_schema(qualname)
        kernels[name] = frozenset(dev for dev, key in _DISPATCH_KEY.items()
                                  if present and torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key))
    return True, "loaded", kernels


def _has_schema(qualname: str) -> bool:
    namespace, name = qualname.split("::")
    return hasattr(getattr(torch.ops, namespace), name)


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
    return any("cuda" in devices for devices in _EXTENSION[2].values())


def has_kernel(op: str, device_type: str) -> bool:
    """Whether amfor._C holds a kernel of `op` (e.g. "masked_gather") for `device_type` ("cpu", "cuda")."""
    return device_type in _EXTENSION[2].get(op, frozenset())


def has_schema(qualname: str) -> bool:
    """Whether the op `qualname` ("amfor::masked_gather") is defined (by amfor._C or a Python custom_op)."""
    return _has_schema(qualname)


def triton_status() -> tuple[bool, str]:
    """(importable, reason) for Triton."""
    return _TRITON


def triton_interpreted() -> bool:
    """Whether Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reasons(device: torch.device | str, op: str | None = None,
                        implementations: Sequence[str] | None = None) -> dict[str, str]:
    """Backends that cannot run on `device`, each with the reason.

    With `op`, also the compiled backends whose kernel of that op amfor._C lacks on the device type, and the
    backends not among `implementations` (the ones the op has at all).
    """
    device = torch.device(device)
    reasons: dict[str, str] = {}
    ext_ok, ext_why = extension_status()
    triton_ok, triton_why = triton_status()
    if device.type == "cuda":
        reasons["cpp"] = "cpp runs on CPU tensors only"
        if not ext_ok:
            reasons["cuda"] = ext_why
        elif not extension_has_cuda():
            reasons["cuda"] = ("amfor._C was built without its CUDA kernels (no CUDA toolkit or a CPU build of torch "
                               "at install time, or the CUDA part failed to compile: `pip install -v` shows the "
                               "build's warning, AMFOR_BUILD_CUDA=1 makes it an error)")
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
    if op is not None:
        for backend in BACKENDS[1:]:
            if implementations is not None and backend not in implementations and backend not in reasons:
                reasons[backend] = f"{op} has no {backend} implementation"
        compiled = "cuda" if device.type == "cuda" else "cpp"
        if compiled not in reasons and not has_kernel(op, device.type):
            reasons[compiled] = (f"amfor._C has no {device.type} kernel of {op} "
                                 "(rebuild it: `pip install -e . --no-build-isolation`)")
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


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@torch.compiler.assume_constant_result
def resolve(op: str, device: torch.device, auto_order: Mapping[str, Sequence[str]],
            dtype: torch.dtype | None = None, *, implementations: Sequence[str] | None = None,
            dtypes: Mapping[str, Sequence[torch.dtype]] | None = None) -> str:
    """The concrete backend for `op` on `device`; a clear error when a forced one cannot run there.

    auto_order maps a device type ("cpu", "cuda"), or a device type and dtype ("cuda:float64"), which takes
    precedence for that dtype, to the op's implementations from fastest to slowest, as measured.
    implementations: the backends the op has (None: all); dtypes: backend -> the dtypes it takes (absent: all).
    auto skips a candidate that cannot run or does not take `dtype`; a forced backend that cannot run raises
    RuntimeError, one that does not take the dtype TypeError. Under torch.compile the choice is made once,
    at trace time.
    """
    name = current_backend()
    missing = unavailable_reasons(device, op, implementations)
    takes = dtypes or {}

    def accepts(backend: str) -> bool:
        return dtype is None or backend not in takes or dtype in takes[backend]

    if name == "auto":
        order = auto_order.get(device.type, ())
        if dtype is not None:
            order = auto_order.get(f"{device.type}:{_dtype_name(dtype)}", order)
        for candidate in order:
            if candidate not in missing and accepts(candidate):
                return candidate
        return "torch"
    if name in missing:
        raise RuntimeError(f"amfor backend {name!r} cannot run {op} on {device}: {missing[name]}")
    if not accepts(name):
        supported = ", ".join(_dtype_name(d) for d in takes[name])
        raise TypeError(f"amfor backend {name!r} cannot run {op} on {device}: it takes {supported}, "
                        f"got {_dtype_name(dtype)}")
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
