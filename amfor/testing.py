"""Helpers for testing amfor ops (used by tests/ and benchmarks/; also useful to anyone adding an op).

- `devices()`: "cpu", plus "cuda" when a GPU is present.
- `backends(device, op=None)`: the concrete backends that run there (`torch` always), for `op` when given.
- `require_backend(device, backend, op=None)`: skip the calling test (pytest.skip, with the reason) when
  `backend` cannot run `op` on `device`: a GPU test of a backend that was not built skips, it does not fail.
- `poisoned()`: uninitialised tensors (torch.empty, at::empty) come back filled with NaN, so an output element
  a kernel forgot to write fails the comparison instead of passing by luck.
- `assert_close_lowp(actual, reference, reference_lowp)`: the tolerance rule for low precision: the error of
  `actual` against a float32/float64 reference may be at most 2x the error of the PyTorch reference run in
  the same low precision, plus a small floor; float32 and float64 within 1e-5 relative.
- `fake_cuda()` / `fake_tensors(device)`: the fake-tensor tier: a model and its inputs as fake CUDA (or CPU)
  tensors, run without a driver; it records every amfor op call (device, dtypes, backend), checks that an op's
  tensors share one device and one floating dtype, and counts the host synchronisations (see `FakeTier`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from amfor.ops import available_backends, unavailable_reasons

LOW_PRECISION = (torch.float16, torch.bfloat16)


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


# ---------------------------------------------------------------------------------------------------------
# The fake-tensor tier: shapes, devices, dtypes and host synchronisations of a whole model step, no GPU needed
# ---------------------------------------------------------------------------------------------------------
_AMFOR_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class HostSyncError(AssertionError):
    """More host synchronisations than allowed; the message lists where each happened."""


class OpInputError(AssertionError):
    """An amfor op received tensors on several devices or of several floating dtypes."""


def _call_site(depth: int = 3) -> str:
    """The innermost amfor frames below the tier, innermost first ("amfor/utils/ranges.py:13 in out_of_range
    <- amfor/losses/identity.py:35 in identity_loss <- ..."), else the caller's frame."""
    import traceback

    here = os.path.abspath(__file__)
    frames = [(os.path.abspath(f.filename), f) for f in traceback.extract_stack()[:-2]]
    frames = [(path, f) for path, f in frames if path != here]
    ours = [(path, f) for path, f in frames if path.startswith(_AMFOR_DIR)][::-1][:depth]
    if not ours:
        return f"{frames[-1][0]}:{frames[-1][1].lineno} in {frames[-1][1].name}"
    return " <- ".join(f"amfor/{path[len(_AMFOR_DIR):]}:{f.lineno} in {f.name}" for path, f in ours)


def _tensors(args, kwargs) -> list[torch.Tensor]:
    flat, _ = torch.utils._pytree.tree_flatten((args, kwargs))
    return [t for t in flat if isinstance(t, torch.Tensor)]


def _is_sync(func, args, kwargs) -> str | None:
    """What kind of host synchronisation `func` is on a GPU (None: none): a read of a value (item, bool, int),
    an output whose shape depends on the data (nonzero, unique, boolean indexing), a copy to the host."""
    if func is torch.ops.aten._local_scalar_dense.default:
        return "a read of a device value (item / bool / int / float)"
    if func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(t is not None and t.dtype == torch.bool for t in indices):
            return "boolean indexing (the output's shape depends on the data)"
        return None
    if torch.Tag.dynamic_output_shape in func.tags or torch.Tag.data_dependent_output in func.tags:
        return f"{func.overloadpacket.__name__} (the output's shape depends on the data)"
    if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
        src = args[1] if func is torch.ops.aten.copy_.default else args[0]
        dst = args[0].device if func is torch.ops.aten.copy_.default else kwargs.get("device") or src.device
        if src.device.type == "cuda" and torch.device(dst).type == "cpu":
            return "a copy from the GPU to the host"
    return None


class FakeTier(torch.utils._python_dispatch.TorchDispatchMode):
    """What `fake_tensors` yields: converts real tensors and modules, records op calls and host syncs.

    - `tensor(t)` / `module(m)`: t (every parameter and buffer of m) as a fake tensor on the tier's device.
    - `syncs`: [(kind, call site)] of every host synchronisation since the last `reset()`. On fake tensors a
      value read cannot be answered: it is counted and answered with 0 / False (the passing side of a check,
      "no inf" for GradScaler), so the step runs on and every sync of it is counted, not just the first.
    - `ops`: [(op, device, dtype, backend)] of every public amfor op call (its backend choice), and
      `op_inputs`: [(torch.ops name, devices, floating dtypes)] of every `amfor::` op that ran.
    - `assert_syncs(at_most, what)`: raise HostSyncError listing the call sites when there are more.
    An `amfor::` op given tensors on two devices or of two floating dtypes raises OpInputError at once.
    """

    def __init__(self, fake_mode, device: torch.device) -> None:
        super().__init__()
        self.fake_mode, self.device = fake_mode, device
        self.syncs: list[tuple[str, str]] = []
        self.ops: list[tuple[str, torch.device, torch.dtype | None, str]] = []
        self.op_inputs: list[tuple[str, tuple[str, ...], tuple[torch.dtype, ...]]] = []

    def reset(self) -> None:
        self.syncs, self.ops, self.op_inputs = [], [], []

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        with self.fake_mode:
            return self.fake_mode.from_tensor(t).to(self.device)

    def module(self, m: torch.nn.Module) -> torch.nn.Module:
        """m with every parameter and buffer replaced, in place, by a fake one on the tier's device; build m
        outside the block (a module built inside already holds fake tensors of the default device)."""
        return m._apply(self.tensor)

    def assert_syncs(self, at_most: int, what: str = "the step") -> None:
        if len(self.syncs) > at_most:
            sites = "\n".join(f"  {kind}: {site}" for kind, site in self.syncs)
            raise HostSyncError(f"{what} synchronised with the host {len(self.syncs)} times (at most {at_most} "
                                f"allowed):\n{sites}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _is_sync(func, args, kwargs)
        if kind is not None:
            self.syncs.append((kind, _call_site()))
            if func is torch.ops.aten._local_scalar_dense.default:
                return _zero_of(args[0].dtype)
        if func.namespace == "amfor":
            self._check_op(func, args, kwargs)
        return func(*args, **kwargs)

    def _check_op(self, func, args, kwargs) -> None:
        """One device for all tensors; one floating dtype for the data, float32 (float64 for float64 data) for
        the arguments the ops' contract keeps in the accumulation dtype (`ACCUMULATION_ARGS`)."""
        named = dict(zip((a.name for a in func._schema.arguments), args, strict=False)) | kwargs
        devices, data, acc = set(), set(), set()
        for name, value in named.items():
            for t in _tensors(value, {}):
                devices.add(str(t.device))
                if t.is_floating_point():
                    (acc if name in ACCUMULATION_ARGS else data).add(t.dtype)
        self.op_inputs.append((str(func), tuple(sorted(devices)), tuple(sorted(data | acc, key=str))))
        want_acc = {torch.promote_types(d, torch.float32) for d in data}
        if len(devices) > 1 or len(data) > 1 or (acc and acc != want_acc):
            dtypes = ", ".join(sorted(map(str, data | acc)))
            raise OpInputError(f"{func} got tensors on {', '.join(sorted(devices))} of {dtypes} (one device, one "
                               f"dtype, {'/'.join(ACCUMULATION_ARGS)} in float32) at {_call_site()}")


ACCUMULATION_ARGS = ("weights", "lse")  # amfor ops' arguments in float32 whatever the data's low precision


def _zero_of(dtype: torch.dtype):
    if dtype == torch.bool:
        return False
    return 0.0 if dtype.is_floating_point or dtype.is_complex else 0


@contextlib.contextmanager
def fake_tensors(device: str | torch.device = "cuda") -> Iterator[FakeTier]:
    """Run the block on fake tensors of `device`: shapes, devices and dtypes propagate, no kernel runs.

    Yields a `FakeTier`; convert the model and inputs with it. On "cuda" the few calls that would need a
    driver are patched: autocast's availability and bf16 checks, and the CUDA-graph capture query. Backward
    on fake CUDA needs a GPU runtime (autograd's device guards): run training steps on fake CPU instead.
    """
    from unittest import mock

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    device = torch.device(device)
    from amfor.ops import _registry

    # a shape environment: an op whose output's shape depends on the data (torch.unique) gets a symbolic size;
    # inputs keep their static shapes
    fake_mode = FakeTensorMode(allow_non_fake_inputs=False, shape_env=ShapeEnv(), static_shapes=True)
    tier = FakeTier(fake_mode, device)
    choose = _registry.Dispatch.backend

    def recorded_backend(dispatch, dev, dtype=None):
        backend = choose(dispatch, dev, dtype)
        tier.ops.append((dispatch.op, dev, dtype, backend))
        return backend

    patches = [mock.patch.object(_registry.Dispatch, "backend", recorded_backend)]
    if device.type == "cuda":
        patches += [mock.patch("torch.cuda.amp.common.amp_definitely_not_available", return_value=False),
                    mock.patch("torch.cuda.is_bf16_supported", return_value=True),
                    mock.patch("torch.cuda.is_current_stream_capturing", return_value=False)]
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        stack.enter_context(fake_mode)
        stack.enter_context(tier)
        yield tier


def fake_cuda() -> contextlib.AbstractContextManager[FakeTier]:
    """`fake_tensors("cuda")`: the model's CUDA path (every backend's choice, autocast, dtypes) on a machine
    without a GPU."""
    return fake_tensors("cuda")
