"""The one op layer (amfor/ops/_registry.py) and what every Triton launch site shares (amfor/kernels/_launch.py)."""

import contextlib
import re
import types
from pathlib import Path

import pytest
import torch

import amfor.ops as ops
from amfor.ops import _registry, backend_for, use_backend

ROOT = Path(__file__).resolve().parents[2]
FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
PUBLIC_OPS = ("masked_gather", "masked_scatter", "query_fusion_attention", "distill_kl_loss", "rank_metrics")


def test_every_op_family_is_declared():
    assert set(PUBLIC_OPS) <= set(_registry.DISPATCH)


@pytest.mark.parametrize("op", PUBLIC_OPS)
@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_auto_choice_takes_every_dtype(op, device, dtype):
    """Every candidate of auto's order for (device, dtype) takes that dtype, so auto never picks a backend that
    then raises (float64 query fusion on CUDA went to Triton, which has no float64 kernels)."""
    info = _registry.DISPATCH[op]
    name = str(dtype).removeprefix("torch.")
    order = info.auto_order.get(f"{device}:{name}", info.auto_order.get(device, ()))
    for candidate in order:
        assert dtype in info.dtypes.get(candidate, FLOATS), f"auto order of {op} on {device} offers {candidate}"
    with use_backend("auto"):
        chosen = backend_for(op, device, dtype)
    assert dtype in info.dtypes.get(chosen, FLOATS)


def test_float64_query_fusion_on_cuda_takes_the_cuda_kernel():
    if "cuda" not in ops.available_backends("cuda", "query_fusion_attention"):
        pytest.skip("amfor._C has no CUDA kernels here")
    with use_backend("auto"):
        assert backend_for("query_fusion_attention", "cuda", torch.float64) == "cuda"
        assert backend_for("query_fusion_attention", "cuda", torch.bfloat16) == "triton"


@pytest.mark.parametrize("op", PUBLIC_OPS)
def test_forced_unavailable_backend_names_what_is_missing(op):
    """One error text for every op: the backend, the op, the device and the reason."""
    with use_backend("cuda"), pytest.raises(RuntimeError, match=rf"amfor backend 'cuda' cannot run {op} on cpu: "):
        backend_for(op, "cpu")


def test_backends_an_op_lacks_are_reported_per_op():
    reasons = ops.unavailable_reasons("cpu", "rank_metrics")
    assert reasons["triton"] == "rank_metrics has no triton implementation"
    assert "rank_metrics" in ops.unavailable_reasons("cuda", "rank_metrics")["cuda"]
    assert "triton" not in ops.available_backends("cpu", "rank_metrics")
    with use_backend("triton"), pytest.raises(RuntimeError, match="rank_metrics has no triton implementation"):
        backend_for("rank_metrics", "cpu")


def test_compiled_kernels_are_checked_per_op():
    """Whether amfor._C has a kernel is decided per op and device type, not from masked_gather alone."""
    if not ops.extension_status()[0]:
        pytest.skip("amfor._C is not built")
    for op in PUBLIC_OPS:
        assert ops.has_kernel(op, "cpu"), op
    assert not ops.has_kernel("rank_metrics", "cuda")  # CPU only by design
    assert ops.has_kernel("no_such_op", "cpu") is False


def test_dtype_a_forced_backend_lacks_is_a_type_error():
    with use_backend("triton"), pytest.raises(TypeError, match="cannot run query_fusion_attention .* float64"):
        backend_for("query_fusion_attention", "cuda" if ops.triton_status()[0] else "cpu", torch.float64)


def test_nothing_outside_amfor_ops_imports_backend():
    pattern = re.compile(r"^\s*(from amfor\.ops\._backend import|from amfor\.ops import[^\n]*\b_backend\b|"
                         r"import amfor\.ops\._backend)", re.M)
    offenders = []
    for folder in ("amfor", "benchmarks", "tests", "scripts", "kernels"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.is_relative_to(ROOT / "amfor" / "ops"):
                continue
            if pattern.search(path.read_text()):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"import the public queries of amfor.ops instead of _backend: {offenders}"


# ---------------------------------------------------------------------------------------------------------
# Triton launch sites: the tensor's device is the current one
# ---------------------------------------------------------------------------------------------------------
def test_on_device_makes_the_tensors_device_current(monkeypatch):
    from amfor.kernels import _launch

    made = []

    @contextlib.contextmanager
    def fake_device(device):
        made.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    with _launch.on_device(types.SimpleNamespace(device=torch.device("cuda", 1))):
        pass
    with _launch.on_device(torch.zeros(1)):
        pass
    assert made == [torch.device("cuda", 1)], "a CUDA tensor's device is made current; a CPU tensor needs nothing"


def test_triton_launches_run_on_the_tensors_device(monkeypatch):
    """Every launch of every Triton kernel happens inside on_device(<an input of the launch>)."""
    from amfor.kernels import distill_loss, masked_patches, query_fusion

    current: list[torch.device] = []
    launches: list[tuple[str, torch.device | None]] = []

    @contextlib.contextmanager
    def fake_on_device(t):
        current.append(t.device)
        try:
            yield
        finally:
            current.pop()

    class FakeKernel:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, current[-1] if current else None))

    kernels = set()
    for module in (distill_loss, masked_patches, query_fusion):
        monkeypatch.setattr(module, "on_device", fake_on_device)
        for name in dir(module):
            if name.endswith("_kernel") and hasattr(getattr(module, name), "__getitem__"):
                monkeypatch.setattr(module, name, FakeKernel(name))
                kernels.add(name)
    x, idx = torch.randn(2, 5, 8), torch.tensor([[0, 3], [1, 4]])
    masked_patches.gather_rows(x, idx, None, None, pos_by_output=False)
    masked_patches.segment_sum_rows(x, torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long), 3)
    q, k, w = torch.randn(1, 2, 3, 16), [torch.randn(1, 2, 7, 16) for _ in range(2)], torch.rand(1, 3, 2)
    query_fusion.forward(q, k, k, w, None, 0.25)
    query_fusion.backward(torch.randn_like(q), q, k, k, w, None, 0.25, torch.zeros(1, 2, 3, 2))
    distill_loss.distill_kl_rows(torch.randn(1, 2, 9), torch.randn(1, 2, 9), 2.0, None, 0.5, True, False)
    assert {name for name, _ in launches} == kernels, "every kernel was launched once at least"
    assert all(dev == torch.device("cpu") for _, dev in launches), launches


@pytest.mark.gpu
def test_gpu_ops_on_a_second_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    from amfor.testing import require_backend

    require_backend("cuda", "triton")
    x = torch.randn(2, 9, 64, device="cuda:1")
    index = torch.tensor([[0, 3, 8], [1, 2, 2]], device="cuda:1")
    s, t = torch.randn(2, 3, 751, device="cuda:1"), torch.randn(2, 3, 751, device="cuda:1")
    with torch.cuda.device(0), use_backend("triton"):
        kept = ops.masked_gather(x, index)
        loss = ops.distill_kl_loss(s, t, 2.0)
    torch.testing.assert_close(kept, x.gather(1, index[:, :, None].expand(-1, -1, 64)))
    with use_backend("torch"):
        torch.testing.assert_close(loss, ops.distill_kl_loss(s, t, 2.0))
