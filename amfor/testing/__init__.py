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

from amfor.testing.backends import backends, devices, require_backend
from amfor.testing.compare import LOW_PRECISION, assert_close_lowp, poisoned
from amfor.testing.fake import FakeTier, HostSyncError, OpInputError, fake_cuda, fake_tensors

__all__ = ["LOW_PRECISION", "FakeTier", "HostSyncError", "OpInputError", "assert_close_lowp", "backends", "devices",
           "fake_cuda", "fake_tensors", "poisoned", "require_backend"]
