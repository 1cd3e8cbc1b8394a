"""distill_kl_loss throughput: `reference`, `reference_compiled`, `liger` (Liger's KL loss), `triton`, `cuda`, `cpp`.

Sizes: G = 11 granularities, B = 64, C in {702, 751, 1501, 4101} identities, bfloat16 and float32 (on the CPU
a smaller batch and two class counts, so the file finishes in a few minutes). Modes, as in training (the student
requires grad, the teacher does not):
- forward:  the loss (the fused kernels also write the student's gradient here: that is their design);
- backward: the backward alone, after an untimed forward (CUDA events around backward on GPU; setup on CPU);
- full:     forward + backward (torch.autograd.grad of the loss).
extra_info: median_ms, GB/s over the ideal traffic (forward: read both logits; backward: write the gradient; full:
read both, write the gradient), copy_fraction, and on GPU for "full": launches (CUDA kernels per forward+backward,
torch.profiler) and peak_extra_bytes (torch.cuda.max_memory_allocated above the inputs during forward+backward,
the returned gradient included) with grad_bytes (one gradient tensor) to compare with.
"""

from __future__ import annotations

import importlib.util
import statistics

import pytest
import torch

from amfor.ops import distill_kl_loss, use_backend
from amfor.ops.distill_loss import distill_kl_loss_reference
from amfor.utils.threads import torch_threads
from benchmarks.common import (
    MODES,
    QUICK,
    REFERENCE,
    REFERENCE_COMPILED,
    check_close,
    copy_bandwidth_gbps,
    measure,
    skip_unless,
    stats_median_ms,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
G = 11
B = 64 if DEVICE == "cuda" else 8
CLASSES = (751,) if QUICK else (702, 751, 1501, 4101) if DEVICE == "cuda" else (751, 4101)
DTYPES = (torch.bfloat16,) if QUICK else (torch.bfloat16, torch.float32)
PROVIDERS = (REFERENCE, REFERENCE_COMPILED, "liger", "triton", "cuda", "cpp")
TEMPERATURE = 4.0
ROUNDS = 50 if DEVICE == "cuda" else 10
_COMPILED: dict = {}


@pytest.fixture(autouse=True)
def _single_cpu_thread():
    """On the CPU, time every provider on one thread (restored afterwards).

    Measured on the 2-vCPU CI machine: with two threads, medians jump between ~0.4 ms and 4-150 ms in steps of
    ~4 ms (the scheduler tick) as OpenMP workers sleep and wake, for every provider; one thread is stable.
    """
    if DEVICE != "cpu":
        yield
        return
    with torch_threads(1):
        yield


def _liger_loss_fn():
    """Liger's KL loss fed log-probabilities (as it expects), scaled like distill_kl_loss; None if not installed."""
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    from liger_kernel.transformers import LigerKLDIVLoss

    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)

    def loss(student, teacher, temperature):
        C = student.shape[-1]
        log_ps = torch.log_softmax(student.float() / temperature, -1).reshape(-1, C)
        log_pt = torch.log_softmax(teacher.float() / temperature, -1).reshape(-1, C)
        # batchmean over the G * B rows, times G: sum over granularities of the per-granularity batch mean
        return kl(log_ps, log_pt) * (student.shape[0] * temperature**2)

    return loss


def _loss_fn(provider: str):
    """The callable (student, teacher, T) -> loss of a provider, or skip with the reason."""
    if provider == REFERENCE:
        return distill_kl_loss_reference
    if provider == REFERENCE_COMPILED:
        if "fn" not in _COMPILED:
            _COMPILED["fn"] = torch.compile(distill_kl_loss_reference, fullgraph=True)
        return _COMPILED["fn"]
    if provider == "liger":
        fn = _liger_loss_fn()
        if fn is None:
            pytest.skip("liger-kernel is not installed (an optional peer, not a dependency)")
        if DEVICE != "cuda":
            pytest.skip("Liger's KL loss is a Triton kernel: GPU only here")
        return fn
    if provider == "triton" and DEVICE == "cpu":
        pytest.skip("triton on cpu runs in the interpreter: too slow to benchmark")
    skip_unless(DEVICE, provider, "distill_kl_loss")

    def fused(student, teacher, temperature):
        with use_backend(provider):
            return distill_kl_loss(student, teacher, temperature)

    return fused


def _inputs(C: int, dtype: torch.dtype):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    student = (3 * torch.randn(G, B, C, generator=g, device=DEVICE)).to(dtype).requires_grad_()
    teacher = (3 * torch.randn(G, B, C, generator=g, device=DEVICE)).to(dtype)
    return student, teacher


def _ideal_bytes(mode: str, student: torch.Tensor) -> int:
    unit = student.numel() * student.element_size()
    return {"forward": 2 * unit, "backward": unit, "full": 3 * unit}[mode]


def _time_backward(benchmark, fn, student, teacher) -> float:
    """Median ms of the backward alone: an untimed forward before every timed backward."""
    def setup():
        return (fn(student, teacher, TEMPERATURE),), {}

    def backward(loss):
        torch.autograd.grad(loss, student)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    if DEVICE == "cuda":
        times = []
        for i in range(ROUNDS + 5):
            loss = fn(student, teacher, TEMPERATURE)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            torch.autograd.grad(loss, student)
            end.record()
            torch.cuda.synchronize()
            if i >= 5:  # warm-up
                times.append(start.elapsed_time(end))
        median_ms = statistics.median(times)
    benchmark.pedantic(backward, setup=setup, rounds=ROUNDS, warmup_rounds=1)
    return median_ms if DEVICE == "cuda" else stats_median_ms(benchmark, lambda: backward(*setup()[0]))


def _check_against_reference(fn, student, teacher, what: str) -> None:
    """The loss and its gradient against the eager reference (in float32) before anything is timed."""
    loss = fn(student, teacher, TEMPERATURE)
    (grad,) = torch.autograd.grad(loss, student)
    s32 = student.detach().float().requires_grad_()
    ref = distill_kl_loss_reference(s32, teacher.float(), TEMPERATURE)
    (ref_grad,) = torch.autograd.grad(ref, s32)
    check_close(loss.detach(), ref.detach().to(loss.dtype), f"{what} loss")
    check_close(grad, ref_grad.to(grad.dtype), f"{what} gradient")


def _gpu_launches_and_peak(fn, student, teacher) -> dict:
    """CUDA kernels launched by one forward+backward, and the peak memory above the inputs."""
    grad = lambda: torch.autograd.grad(fn(student, teacher, TEMPERATURE), student)  # noqa: E731
    grad()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        grad()
        torch.cuda.synchronize()
    launches = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = grad()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del result
    return {"launches": launches, "peak_extra_bytes": peak,
            "grad_bytes": student.numel() * student.element_size()}


@pytest.mark.parametrize("mode", ("full",) if QUICK else MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", CLASSES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_distill_kl_loss(benchmark, provider, C, dtype, mode):
    fn = _loss_fn(provider)
    student, teacher = _inputs(C, dtype)
    benchmark.group = f"distill_kl_loss G={G} B={B} C={C} {str(dtype).split('.')[-1]} {mode}"
    info = {"provider": provider, "G": G, "B": B, "C": C, "dtype": str(dtype), "mode": mode}
    nbytes = _ideal_bytes(mode, student)
    _check_against_reference(fn, student, teacher, f"{provider} C={C} {dtype}")
    if mode == "forward":
        median_ms = measure(benchmark, lambda: fn(student, teacher, TEMPERATURE), DEVICE, bytes_moved=nbytes,
                            rounds=ROUNDS, **info)
    elif mode == "full":
        median_ms = measure(benchmark, lambda: torch.autograd.grad(fn(student, teacher, TEMPERATURE), student),
                            DEVICE, bytes_moved=nbytes, rounds=ROUNDS, **info)
    else:
        median_ms = _time_backward(benchmark, fn, student, teacher)
        benchmark.extra_info.update(info)
        benchmark.extra_info.update({"median_ms": median_ms, "bytes": nbytes,
                                     "GB/s": nbytes / (median_ms * 1e-3) / 1e9})
    benchmark.extra_info["copy_fraction"] = benchmark.extra_info["GB/s"] / copy_bandwidth_gbps(nbytes, DEVICE)
    if mode == "full":
        if DEVICE == "cuda":
            benchmark.extra_info.update(_gpu_launches_and_peak(fn, student, teacher))
        else:
            benchmark.extra_info["peak_memory"] = "skipped on cpu: torch keeps no peak counter for CPU allocations"
    assert median_ms > 0
