"""The fake-tensor tier: shapes, devices, dtypes and host synchronisations of a whole model step, no GPU needed.

`fake_cuda()` / `fake_tensors(device)` run a model and its inputs as fake CUDA (or CPU) tensors, without a driver;
the `FakeTier` they yield records every amfor op call (device, dtypes, backend), checks that an op's tensors share
one device and one floating dtype, and counts the host synchronisations.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

_AMFOR_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # amfor/


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
