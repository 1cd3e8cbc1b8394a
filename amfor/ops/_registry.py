"""The one op layer under every amfor op family: registration of the compiled variants, and the backend choice.

Each op family (amfor/ops/<op>.py) declares:
- its torch.library ops as `OpSpec`s (name, fake, setup_context, backward builder) and registers them once per
  implementation with `register_implementation(specs, suffix)`: suffix "_triton" for the Triton custom ops
  defined in the family's file, "" for the C++/CUDA ops of `amfor._C` (None when the extension or the op's
  schema is missing). The backward builder receives the registered ops of the *same* implementation, so a
  Triton forward differentiates through Triton and a compiled one through amfor._C;
- each public op as a `Dispatch` (`declare(op, auto_order, implementations, dtypes)`): `backend(device, dtype)`
  is the concrete backend, chosen per op: whether amfor._C holds a kernel for *this* op and device type,
  whether the op has that implementation at all, which dtypes each implementation takes. Forcing one that
  cannot run raises with one text: "amfor backend 'X' cannot run <op> on <device>: <reason>".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from amfor.ops import _backend

ALL_IMPLEMENTATIONS = ("torch", "triton", "cuda", "cpp")


@dataclass(frozen=True)
class OpSpec:
    """One torch.library op of a family: `amfor::<name><suffix>`.

    fake: the fake (meta) kernel; setup_context and backward: autograd, backward(ops) building the backward
    function from the dict of this implementation's registered ops (None: not differentiable by itself).
    """

    name: str
    fake: Callable
    setup_context: Callable | None = None
    backward: Callable[[dict[str, Callable]], Callable] | None = None


def register_implementation(specs: Sequence[OpSpec], suffix: str) -> dict[str, Callable] | None:
    """Register fakes and autograd of one implementation's ops; {name: op callable}, None if an op is missing."""
    qualnames = {spec.name: f"amfor::{spec.name}{suffix}" for spec in specs}
    if not all(_backend.has_schema(q) for q in qualnames.values()):
        return None
    for spec in specs:
        torch.library.register_fake(qualnames[spec.name])(spec.fake)
    ops = {spec.name: _backend.op(q) for spec in specs for q in (qualnames[spec.name],)}
    for spec in specs:
        if spec.backward is not None:
            torch.library.register_autograd(qualnames[spec.name], spec.backward(ops), setup_context=spec.setup_context)
    return ops


@dataclass(frozen=True)
class Dispatch:
    """The backend choice of one public op: measured auto order, implementations, dtypes per implementation."""

    op: str
    auto_order: Mapping[str, Sequence[str]]
    implementations: tuple[str, ...] = ALL_IMPLEMENTATIONS
    dtypes: Mapping[str, tuple[torch.dtype, ...]] = field(default_factory=dict)

    def backend(self, device: torch.device, dtype: torch.dtype | None = None) -> str:
        """The concrete backend for an input on `device` of `dtype` (see amfor.ops._backend.resolve)."""
        return _backend.resolve(self.op, device, self.auto_order, dtype, implementations=self.implementations,
                                dtypes=self.dtypes)


DISPATCH: dict[str, Dispatch] = {}


def declare(op: str, auto_order: Mapping[str, Sequence[str]], implementations: Sequence[str] = ALL_IMPLEMENTATIONS,
            dtypes: Mapping[str, tuple[torch.dtype, ...]] | None = None) -> Dispatch:
    """Declare a public op's backend choice (once, in its family's file)."""
    DISPATCH[op] = Dispatch(op, dict(auto_order), tuple(implementations), dict(dtypes or {}))
    return DISPATCH[op]


def _dispatch(op: str) -> Dispatch:
    if op not in DISPATCH:
        raise ValueError(f"unknown amfor op {op!r}; known: {', '.join(sorted(DISPATCH))}")
    return DISPATCH[op]


def backend_for(op: str, device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """The backend `op` runs with for an input on `device` of `dtype`, under the current choice (auto, forced)."""
    return _dispatch(op).backend(torch.device(device), dtype)


def unavailable_reasons(device: torch.device | str, op: str | None = None) -> dict[str, str]:
    """Backends that cannot run on `device` (for `op`: also those it lacks or amfor._C has no kernel of), why."""
    implementations = _dispatch(op).implementations if op is not None else None
    return _backend.unavailable_reasons(device, op, implementations)


def available_backends(device: torch.device | str = "cpu", op: str | None = None) -> list[str]:
    """The concrete backends that can run on `device` (for `op` when given), `torch` always among them."""
    missing = unavailable_reasons(device, op)
    return [b for b in _backend.BACKENDS[1:] if b not in missing]
