"""The amfor op calls of one model step, captured and replayed on their own: how much of a training step the fused
ops take on each backend, which bounds what a faster backend can save on the whole step.

`capture_op_calls()` wraps the public ops where the model imports them (SITES) and records every call's inputs
(detached copies that keep `requires_grad`), grad mode and autocast dtype. `replay(calls, grads, backend)` runs
those calls again under `use_backend(backend)`: the forward, and where the output requires grad the backward to
every input that does, with a fixed random output gradient (`output_grads`). The replayed calls see the same
shapes, dtypes, masks and indices as in the step; they do not see the step's cache state, so their sum estimates
the ops' share rather than measuring it.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

import amfor.ops as ops
from amfor.ops import use_backend

OPS = ("masked_gather", "masked_scatter", "query_fusion_attention", "distill_kl_loss")
# module -> the ops it imports by name from amfor.ops (the model calls them under these names)
SITES = {
    "amfor.nn.masked_vit": ("masked_gather", "masked_scatter"),
    "amfor.nn.patch_dropout": ("masked_gather",),
    "amfor.nn.query_fusion": ("query_fusion_attention",),
    "amfor.losses.amgd": ("distill_kl_loss",),
}


@dataclass
class OpCall:
    """One call of a public op: its name, inputs (detached copies), keyword arguments, grad mode and autocast
    dtype (None: autocast off) on the inputs' device."""

    op: str
    args: tuple
    kwargs: dict
    grad_enabled: bool
    autocast: torch.dtype | None
    device: str


def _copy(x):
    """A detached copy of every tensor in x (lists, tuples and dicts followed), requires_grad kept."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone().requires_grad_(x.requires_grad)
    if isinstance(x, (list, tuple)):
        return type(x)(_copy(v) for v in x)
    if isinstance(x, dict):  # keyword arguments: a tensor passed by name is copied like a positional one
        return {k: _copy(v) for k, v in x.items()}
    return x


def _tensors(x) -> list[torch.Tensor]:
    """The tensors in x that require grad (lists and tuples followed)."""
    if isinstance(x, torch.Tensor):
        return [x] if x.requires_grad else []
    if isinstance(x, (list, tuple, dict)):
        return [t for v in (x.values() if isinstance(x, dict) else x) for t in _tensors(v)]
    return []


def _recording(op: str, fn: Callable, calls: list[OpCall]) -> Callable:
    def record(*args, **kwargs):
        device = args[0].device.type  # every op's first argument is a tensor
        amp = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        calls.append(OpCall(op, _copy(args), _copy(kwargs), torch.is_grad_enabled(), amp, device))
        return fn(*args, **kwargs)
    return record


@contextlib.contextmanager
def capture_op_calls() -> Iterator[list[OpCall]]:
    """Record every call of OPS the model makes inside the block -> the list of calls, in call order."""
    calls: list[OpCall] = []
    originals = []
    try:
        for name, names in SITES.items():
            module = importlib.import_module(name)
            for op in names:
                originals.append((module, op, getattr(module, op)))
                setattr(module, op, _recording(op, getattr(module, op), calls))
        yield calls
    finally:
        for module, op, fn in originals:
            setattr(module, op, fn)


def _run(call: OpCall, grad_out: torch.Tensor | None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """(output, input gradients) of one call; the gradients are empty where nothing requires grad."""
    amp = torch.autocast(call.device, dtype=call.autocast, enabled=call.autocast is not None)
    with torch.set_grad_enabled(call.grad_enabled), amp:
        out = getattr(ops, call.op)(*call.args, **call.kwargs)
    inputs = _tensors(call.args) + _tensors(call.kwargs)
    if grad_out is None or not out.requires_grad or not inputs:
        return out, ()
    return out, torch.autograd.grad(out, inputs, grad_out, allow_unused=True)


def output_grads(calls: list[OpCall], seed: int = 0) -> list[torch.Tensor | None]:
    """A fixed random output gradient per call (None where the output does not require grad), from the torch
    reference's outputs."""
    g = torch.Generator().manual_seed(seed)
    grads = []
    with use_backend("torch"):
        for call in calls:
            out, _ = _run(call, None)
            grads.append(torch.randn(out.shape, generator=g).to(out) if out.requires_grad else None)
    return grads


def replay(calls: list[OpCall], grads: list[torch.Tensor | None], backend: str) -> Callable[[], list]:
    """A function that runs `calls` (forward and backward) under `backend` and returns each call's
    (output, input gradients); on CUDA it synchronises before returning."""
    cuda = any(c.device == "cuda" for c in calls)

    def run() -> list:
        with use_backend(backend):
            results = [_run(call, grad) for call, grad in zip(calls, grads, strict=True)]
        if cuda:
            torch.cuda.synchronize()
        return results
    return run
