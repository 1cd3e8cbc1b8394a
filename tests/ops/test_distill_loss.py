"""distill_kl_loss: the reference against hand-derived values, every backend against the reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from amfor.ops import distill_kl_loss, extension_status, use_backend
from amfor.ops import distill_loss as dl
from amfor.testing import assert_close_lowp, backends, devices, poisoned, require_backend

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKEND_CASES = [(d, b) for d in devices() for b in backends(d)]
FUSED_CPU = [b for b in backends("cpu") if b != "torch"]
needs_ext = pytest.mark.skipif(not extension_status()[0], reason="amfor._C is not built")
INTERPRETED = not torch.cuda.is_available()


def _shapes(device: str, backend: str) -> list[tuple[int, int, int]]:
    """(G, B, C) cases: G in {1, 9, 11}, B in {1, 64}, odd class counts; fewer rows under the Triton interpreter."""
    if backend == "triton" and device == "cpu":  # each program costs milliseconds in the interpreter
        return [(1, 1, 751), (11, 1, 1501), (1, 64, 37), (9, 1, 4101)]
    return [(1, 1, 751), (9, 64, 702), (11, 64, 1501), (11, 1, 4101), (1, 64, 11001)]


def _logits(G, B, C, dtype, device, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = (scale * torch.randn(G, B, C, generator=g)).to(device=device, dtype=dtype)
    t = (scale * torch.randn(G, B, C, generator=g)).to(device=device, dtype=dtype)
    return s, t


def _reference_grads(s, t, temperature, weights, reduction, grad_out, teacher_grad=True):
    """Loss and gradients of the reference in float64 on copies of the inputs (the ground truth)."""
    acc = torch.float64
    leaves = [s.detach().to(acc).requires_grad_(), t.detach().to(acc).requires_grad_(teacher_grad)]
    w = None if weights is None else weights.detach().to(acc).requires_grad_()
    out = dl.distill_kl_loss_reference(leaves[0], leaves[1], temperature, w, reduction)
    wanted = [x for x in (*leaves, w) if x is not None and x.requires_grad]
    grads = torch.autograd.grad(out, wanted, grad_out.to(out.dtype))
    return out.detach(), grads


def _interpreter_slack(backend: str, device: str, dtype: torch.dtype, want: torch.Tensor) -> float:
    """One bf16 ulp of the largest value: the Triton interpreter truncates float32 -> bfloat16 stores (measured),
    where GPUs round to nearest even."""
    if dtype == torch.bfloat16 and backend == "triton" and device == "cpu":
        return torch.finfo(dtype).eps * want.abs().max().item()
    return 0.0


def _assert_close32(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """float32 against the float64 truth: within 1e-5 relative to the tensor's largest value."""
    assert got.shape == want.shape, f"{name}: shape {list(got.shape)} != {list(want.shape)}"
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    assert err <= 1e-5 * scale + 1e-7, f"{name}: max error {err:.3g} > 1e-5 x {scale:.3g}"


# ---------------------------------------------------------------------------------------------------------
# Reference semantics
# ---------------------------------------------------------------------------------------------------------
def test_reference_hand_cases():
    """p_t = (3/4, 1/4), p_s = (1/2, 1/2): KL = 3/4 log(3/2) + 1/4 log(1/2); T = 2 scales the logits and by T^2."""
    teacher = torch.tensor([[2 * math.log(3.0), 0.0]])  # / T = 2 -> softmax (3/4, 1/4)
    student = torch.tensor([[5.0, 5.0]])
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    out = dl.distill_kl_loss_reference(student, teacher, temperature=2.0)
    torch.testing.assert_close(out, torch.tensor(4 * kl))
    s = student.clone().requires_grad_()
    dl.distill_kl_loss_reference(s, teacher, 2.0).backward()
    torch.testing.assert_close(s.grad, 2.0 * (torch.tensor([[0.5, 0.5]]) - torch.tensor([[0.75, 0.25]])))


def test_reference_matches_kl_div_and_reductions():
    s, t = _logits(3, 5, 17, torch.float64, "cpu")
    T = 1.7
    kl = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="none", log_target=True).sum(-1)
    rows = kl * T * T  # [G, B]
    w = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)
    ref = dl.distill_kl_loss_reference
    torch.testing.assert_close(ref(s, t, T), rows.sum() / 5)
    torch.testing.assert_close(ref(s, t, T, w), (rows * w[:, None]).sum() / 5)
    torch.testing.assert_close(ref(s, t, T, w, "sum"), (rows * w[:, None]).sum())
    torch.testing.assert_close(ref(s, t, T, w, "none"), rows * w[:, None])
    torch.testing.assert_close(ref(s[0], t[0], T, reduction="none"), rows[0])
    torch.testing.assert_close(ref(s[0], t[0], T), F.kl_div(F.log_softmax(s[0] / T, -1), F.log_softmax(t[0] / T, -1),
                                                           reduction="batchmean", log_target=True) * T * T)


def test_reference_minus_inf_teacher_and_empty_rows():
    s = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[0.0, float("-inf"), 1.0, float("-inf")], [float("-inf")] * 4], dtype=torch.float64,
                     requires_grad=True)
    out = dl.distill_kl_loss_reference(s, t, 1.0, reduction="none")
    keep = torch.tensor([0, 2])
    p_t = F.softmax(t[0, keep], -1)  # the student's softmax still runs over all four classes
    expected = (p_t * (p_t.log() - F.log_softmax(s[0], -1)[keep])).sum()
    torch.testing.assert_close(out, torch.stack([expected, torch.zeros((), dtype=torch.float64)]))
    out.sum().backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    assert (s.grad[1] == 0).all() and (t.grad[1] == 0).all() and (t.grad[0, [1, 3]] == 0).all()


# ---------------------------------------------------------------------------------------------------------
# Every backend against the reference
# ---------------------------------------------------------------------------------------------------------
def _check(backend, device, G, B, C, dtype, reduction="batchmean", weights=True, teacher_grad=False, T=2.0, seed=0,
           grad_scale=4.0):
    """Loss and gradients of `backend` against the reference.

    The fused kernels store the gradient for grad_output = 1, already in the logits dtype (float32 for float16
    logits); the backward multiplies it by grad_output. That is exact for powers of two (grad_scale 4.0, an AMP
    loss scale); any other grad_output (grad_scale 2.5, or random per row with reduction "none") rounds a second
    time in float16/bfloat16, which the comparison allows for: half an ulp of the largest gradient on top of the
    project's rule.
    """
    s, t = _logits(G, B, C, dtype, device, seed)
    s.requires_grad_(True)
    t.requires_grad_(teacher_grad)
    w = torch.rand(G, device=device, generator=None) + 0.5 if weights else None
    if w is not None:
        w.requires_grad_(True)
    s_before, t_before = s.detach().clone(), t.detach().clone()
    with use_backend(backend), poisoned():
        out = distill_kl_loss(s, t, T, w, reduction)
        grad_out = torch.randn_like(out) if reduction == "none" else torch.tensor(grad_scale, device=device)
        wanted = [x for x in (s, t, w) if x is not None and x.requires_grad]
        grads = torch.autograd.grad(out, wanted, grad_out)
    assert torch.equal(s.detach(), s_before) and torch.equal(t.detach(), t_before), "the caller's logits changed"
    ref, ref_grads = _reference_grads(s, t, T, w, reduction, grad_out, teacher_grad)
    assert out.dtype == torch.float32
    _assert_close32(out, ref, f"loss {G}x{B}x{C}")
    names = ["grad student"] + (["grad teacher"] if teacher_grad else []) + (["grad weights"] if weights else [])
    for name, got, want in zip(names, grads, ref_grads, strict=True):
        if name == "grad weights" or dtype == torch.float32:  # the weights' gradient is float32 in every case
            _assert_close32(got, want, f"{name} {G}x{B}x{C}")
        else:
            assert got.dtype == dtype
            floor = 1e-4
            exact_scale = reduction != "none" and math.frexp(grad_scale)[0] == 0.5
            if dtype in (torch.float16, torch.bfloat16) and not exact_scale:
                floor += 0.5 * torch.finfo(dtype).eps * want.abs().max().item()
            floor += _interpreter_slack(backend, device, got.dtype, want)
            assert_close_lowp(got, want, want.to(dtype), floor=floor, name=f"{name} {G}x{B}x{C}")


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(device, backend, dtype):
    for G, B, C in _shapes(device, backend):
        _check(backend, device, G, B, C, dtype)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("reduction", dl.REDUCTIONS)
def test_reductions_grad_output_and_teacher_grad(device, backend, reduction):
    """grad_output != 1 (2.5, or random per row for 'none'), weights, and the teacher's gradient."""
    G, B, C = (3, 2, 129) if backend == "triton" and device == "cpu" else (9, 64, 751)
    for dtype in (torch.float32, torch.bfloat16):
        _check(backend, device, G, B, C, dtype, reduction=reduction, teacher_grad=True, T=0.7, grad_scale=2.5)
    _check(backend, device, G, B, C, torch.float16, reduction=reduction, teacher_grad=True, grad_scale=1.0)
    _check(backend, device, G, B, C, torch.float32, reduction=reduction, weights=False)


def _relative_errors(got: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Per-entry |got - truth| / |truth| where the float64 truth is not 0: its mean and 99th percentile, and the
    share of those entries that came out 0 (flushed)."""
    nonzero = truth != 0
    rel = ((got.double() - truth).abs() / truth.abs())[nonzero]
    return {"mean": rel.mean().item(), "q99": rel.quantile(0.99).item(),
            "flushed": (got[nonzero] == 0).double().mean().item()}


@pytest.mark.parametrize("device,backend", [(d, b) for d, b in BACKEND_CASES if b != "torch"])
def test_float16_gradients_under_an_amp_loss_scale(device, backend):
    """float16 logits, B = 64, C = 4101, grad_output 2^16 (GradScaler's initial scale): each entry of the batchmean
    gradient before the scale is ~T / (B C), a float16 subnormal. The fused gradient's relative errors against
    float64 (mean, 99th percentile, share flushed to 0) stay within 2x those of the reference path (float32
    math, rounded to float16 once, after the scale)."""
    G = 1 if backend == "triton" and device == "cpu" else 11
    s, t = _logits(G, 64, 4101, torch.float16, device)
    scale = torch.tensor(2.0**16, device=device)

    def grads(fn):
        x, y = s.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
        return torch.autograd.grad(fn(x, y, 2.0), (x, y), scale)

    with use_backend(backend):
        fused = grads(distill_kl_loss)
    reference = grads(dl.distill_kl_loss_reference)
    _, truth = _reference_grads(s, t, 2.0, None, "batchmean", scale)
    for name, got, ref, want in zip(("grad student", "grad teacher"), fused, reference, truth, strict=True):
        assert got.dtype == torch.float16 and ref.dtype == torch.float16
        got_err, ref_err = _relative_errors(got, want), _relative_errors(ref, want)
        for k in got_err:
            assert got_err[k] <= 2 * ref_err[k], f"{name}: {k} relative error {got_err[k]:.3g} > 2 x {ref_err[k]:.3g}"


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_two_dimensional_input(device, backend):
    s, t = _logits(1, 5, 33, torch.float32, device)
    s, t = s[0].requires_grad_(), t[0]
    with use_backend(backend):
        none = distill_kl_loss(s, t, 3.0, reduction="none")
        mean = distill_kl_loss(s, t, 3.0, weights=torch.tensor([2.0], device=device))
        (grad,) = torch.autograd.grad(mean, s)
    s32 = s.detach().requires_grad_()
    ref = dl.distill_kl_loss_reference(s32, t, 3.0, torch.tensor([2.0], device=device))
    assert none.shape == (5,)
    torch.testing.assert_close(none, dl.distill_kl_loss_reference(s, t, 3.0, reduction="none"))
    torch.testing.assert_close(mean, ref)
    torch.testing.assert_close(grad, torch.autograd.grad(ref, s32)[0])


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_teacher_gradient_only_when_required(device, backend):
    s, t = _logits(2, 3, 40, torch.float32, device)
    s.requires_grad_()
    with use_backend(backend):
        distill_kl_loss(s, t).backward()
        assert t.grad is None and s.grad is not None
        with torch.no_grad():
            value = distill_kl_loss(s, t)
    assert not value.requires_grad
    torch.testing.assert_close(value, dl.distill_kl_loss_reference(s.detach(), t))


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_weights_only_and_no_double_counting(device, backend):
    """Gradient for the weights alone; and weights=None gives the same as weights of ones."""
    s, t = _logits(3, 4, 50, torch.float32, device)
    w = torch.tensor([1.0, 2.0, 3.0], device=device, requires_grad=True)
    with use_backend(backend):
        (gw,) = torch.autograd.grad(distill_kl_loss(s, t, 1.5, w), w)
        plain = distill_kl_loss(s, t, 1.5)
        ones = distill_kl_loss(s, t, 1.5, torch.ones(3, device=device))
    rows = dl.distill_kl_rows_reference(s, t, 1.5)
    torch.testing.assert_close(gw, rows.sum(1) / 4)
    torch.testing.assert_close(plain, ones)
    torch.testing.assert_close(plain, rows.sum() / 4)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_non_contiguous_inputs(device, backend):
    g = torch.Generator().manual_seed(5)
    big = torch.randn(3, 2, 90, generator=g).to(device)
    s = big[..., :71]  # rows with stride 90
    t = torch.randn(2, 3, 71, generator=g).to(device).transpose(0, 1)  # [3, 2, 71], not viewable as rows
    s_leaf = s.detach().clone().requires_grad_()
    with use_backend(backend):
        out = distill_kl_loss(s.requires_grad_(), t, 1.3, reduction="none")
        (grad,) = torch.autograd.grad(out.sum(), s)
    ref = dl.distill_kl_loss_reference(s_leaf, t, 1.3, reduction="none")
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, torch.autograd.grad(ref.sum(), s_leaf)[0])


def _loss_and_grads(s, t, temperature, dtype):
    """The reference's per-row loss and its gradients, computed in `dtype` from copies of s and t."""
    s, t = s.detach().to(dtype).requires_grad_(), t.detach().to(dtype).requires_grad_()
    out = dl.distill_kl_loss_reference(s, t, temperature, reduction="none")
    return (out.detach(), *torch.autograd.grad(out.sum(), (s, t)))


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_extreme_logits_and_temperatures(device, backend):
    """Logits up to +-1e4, T from 0.05 to 20, -inf teacher classes and an all -inf teacher row: no NaN/inf."""
    g = torch.Generator().manual_seed(7)
    C = 301
    s = (torch.rand(4, 3, C, generator=g) * 2e4 - 1e4)
    t = (torch.rand(4, 3, C, generator=g) * 2e4 - 1e4)
    t[0, 0, ::2] = float("-inf")
    t[1, 1] = float("-inf")  # the whole row: zero loss, zero gradients
    s[2, 2] = t[2, 2]  # identical rows: zero loss
    for T in (0.05, 1.0, 20.0):
        for dtype in (torch.float32, torch.bfloat16):
            sd, td = s.to(device, dtype).requires_grad_(), t.to(device, dtype).requires_grad_()
            with use_backend(backend):
                out = distill_kl_loss(sd, td, T, reduction="none")
                gs, gt = torch.autograd.grad(out.sum(), (sd, td))
            truth = _loss_and_grads(sd, td, T, torch.float64)
            ref32 = _loss_and_grads(sd, td, T, torch.float32)  # the reference's own float32 error: the yardstick
            for name, got, want, ref in zip(("loss", "grad s", "grad t"), (out, gs, gt), truth, ref32, strict=True):
                assert torch.isfinite(got).all(), f"{name}: non-finite at T={T} {dtype}"
                ref_err = (ref.double() - want).abs().max().item()
                if dtype == torch.bfloat16 and name != "loss":
                    ref_err = (want.to(dtype).double() - want).abs().max().item()
                err = (got.double() - want).abs().max().item()
                allowed = 2 * ref_err + 1e-5 * want.abs().max().item() + 1e-6
                allowed += _interpreter_slack(backend, device, got.dtype, want)
                assert err <= allowed, f"{name} T={T} {dtype}: max error {err:.3g} > {allowed:.3g}"
            assert out[1, 1] == 0 and (gs[1, 1] == 0).all() and (gt[1, 1] == 0).all()
            assert abs(out[2, 2].item()) <= 1e-6 * ref.abs().max().item()


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_empty_batches(device, backend):
    s = torch.randn(3, 0, 20, device=device, requires_grad=True)
    with use_backend(backend):
        out = distill_kl_loss(s, torch.randn(3, 0, 20, device=device))
        out.backward()
        none = distill_kl_loss(s, torch.randn(3, 0, 20, device=device), reduction="none")
    assert out.item() == 0 and s.grad.shape == s.shape and none.shape == (3, 0)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_backward_twice_through_a_retained_graph(device, backend):
    """The first backward scales the stored gradient in place; a second one must recompute, not reuse it."""
    s, t = _logits(2, 3, 45, torch.float32, device)
    s.requires_grad_()
    w = torch.tensor([0.5, 1.5], device=device, requires_grad=True)
    with use_backend(backend):
        out = distill_kl_loss(s, t, 2.0, w)
        first = torch.autograd.grad(out, (s, w), torch.tensor(3.0, device=device), retain_graph=True)
        second = torch.autograd.grad(out, (s, w), torch.tensor(-0.5, device=device))
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(b, a * (-0.5 / 3.0))


@pytest.mark.parametrize("backend", backends("cpu"))
@pytest.mark.slow
def test_gradcheck_float64(backend):
    s = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 7, dtype=torch.float64)
    t[0, 1, 2] = float("-inf")
    t.requires_grad_()
    w = torch.tensor([0.7, 1.9], dtype=torch.float64, requires_grad=True)
    reductions = ("none",) if backend == "triton" and INTERPRETED else dl.REDUCTIONS  # the interpreter is slow
    with use_backend(backend):
        for reduction in reductions:
            fn = lambda a, b, c, r=reduction: distill_kl_loss(a, b, 1.7, c, r)  # noqa: E731
            assert torch.autograd.gradcheck(fn, (s, t, w))


# ---------------------------------------------------------------------------------------------------------
# torch.library registration: opcheck and torch.compile
# ---------------------------------------------------------------------------------------------------------
def _op_names():
    return ["distill_kl_loss_triton"] + (["distill_kl_loss"] if extension_status()[0] else [])


@pytest.mark.parametrize("name", _op_names())
@pytest.mark.parametrize("case", [("batchmean", True, True, True), ("none", True, True, False),
                                  ("sum", False, True, True), ("none", False, False, False)],
                         ids=["batchmean-w-st", "none-w-s", "sum-st", "none-nograd"])
def test_opcheck(name, case):
    reduction, with_weights, student_grad, teacher_grad = case
    op = getattr(torch.ops.amfor, name)
    s = torch.randn(2, 3, 19, requires_grad=True)
    t = torch.randn(2, 3, 19, requires_grad=teacher_grad)
    w = torch.rand(2, requires_grad=True) if with_weights else None
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(op, (s, t, 1.5, w, reduction, student_grad, teacher_grad), test_utils=tests)


@pytest.mark.parametrize("backend", backends("cpu"))
@pytest.mark.slow
def test_compile_fullgraph(backend):
    torch._dynamo.reset()

    def step(s, t, w):
        return distill_kl_loss(s, t, 2.0, w) + distill_kl_loss(s[0], t[0], 0.5, reduction="sum")

    s, t = _logits(3, 4, 29, torch.float32, "cpu")
    w = torch.rand(3, requires_grad=True)
    s_eager, s_comp = s.clone().requires_grad_(), s.clone().requires_grad_()
    with use_backend(backend):
        compiled = torch.compile(step, fullgraph=True)
        got = compiled(s_comp, t, w)
        want = step(s_eager, t, w)
        torch.testing.assert_close(got, want)
        g_comp = torch.autograd.grad(got, (s_comp, w))
        g_eager = torch.autograd.grad(want, (s_eager, w))
    for a, b in zip(g_comp, g_eager, strict=True):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backends("cpu"))
def test_bad_inputs(backend):
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    with use_backend(backend):
        with pytest.raises(ValueError, match="student must be"):
            distill_kl_loss(s[0, 0], t[0, 0])
        with pytest.raises(TypeError, match="student must be float"):
            distill_kl_loss(s.long(), t)
        with pytest.raises(TypeError, match="teacher must be a torch.Tensor"):
            distill_kl_loss(s, t.tolist())
        with pytest.raises(ValueError, match="teacher shape"):
            distill_kl_loss(s, t[:, :2])
        with pytest.raises(TypeError, match="teacher dtype"):
            distill_kl_loss(s, t.double())
        with pytest.raises(ValueError, match="teacher is on meta"):
            distill_kl_loss(s, t.to("meta"))
        with pytest.raises(ValueError, match="C >= 1"):
            distill_kl_loss(s[..., :0], t[..., :0])
        with pytest.raises(ValueError, match="temperature"):
            distill_kl_loss(s, t, 0.0)
        with pytest.raises(ValueError, match="temperature"):
            distill_kl_loss(s, t, float("inf"))
        with pytest.raises(TypeError, match="temperature"):
            distill_kl_loss(s, t, torch.tensor(2.0))
        with pytest.raises(ValueError, match="reduction"):
            distill_kl_loss(s, t, reduction="mean")
        with pytest.raises(ValueError, match=r"weights must have shape \[G\] = \[2\]"):
            distill_kl_loss(s, t, weights=torch.ones(3))
        with pytest.raises(TypeError, match="weights must be"):
            distill_kl_loss(s, t, weights=[1.0, 2.0])
        with pytest.raises(ValueError, match="weights is on meta"):
            distill_kl_loss(s, t, weights=torch.ones(2, device="meta"))


@needs_ext
def test_direct_op_call_checks_inputs():
    op = torch.ops.amfor.distill_kl_loss
    s = torch.randn(1, 2, 5)
    with pytest.raises(RuntimeError, match="teacher shape"):
        op(s, torch.randn(1, 2, 4), 1.0, None, "sum", True, False)
    with pytest.raises(RuntimeError, match="student must have 3 dimensions"):
        op(s[0], s[0], 1.0, None, "sum", True, False)
    with pytest.raises(RuntimeError, match="temperature"):
        op(s, s, -1.0, None, "sum", True, False)
    with pytest.raises(RuntimeError, match="reduction"):
        op(s, s, 1.0, None, "mean", True, False)
    with pytest.raises(RuntimeError, match=r"weights must be \[G\]"):
        op(s, s, 1.0, torch.ones(2), "sum", True, False)
    with pytest.raises(RuntimeError, match="weights must be Float"):
        op(s, s, 1.0, torch.ones(1, dtype=torch.float64), "sum", True, False)
    with pytest.raises(RuntimeError, match="student must be float"):
        op(s.long(), s.long(), 1.0, None, "sum", False, False)


def test_forced_unavailable_backend_names_what_is_missing():
    with use_backend("cuda"), pytest.raises(RuntimeError, match="cuda.*cannot run distill_kl_loss on cpu"):
        distill_kl_loss(torch.randn(2, 3), torch.randn(2, 3))


# ---------------------------------------------------------------------------------------------------------
# GPU tier
# ---------------------------------------------------------------------------------------------------------
GPU_FUSED = ["cuda", "triton"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_FUSED)
def test_gpu_backward_is_deterministic(backend):
    require_backend("cuda", backend, "distill_kl_loss")
    s, t = _logits(11, 64, 4101, torch.bfloat16, "cuda")
    w = torch.rand(11, device="cuda", requires_grad=True)
    results = []
    with use_backend(backend):
        for _ in range(2):
            leaf = s.clone().requires_grad_()
            results.append(torch.autograd.grad(distill_kl_loss(leaf, t, 2.0, w), (leaf, w)))
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_FUSED)
def test_gpu_one_launch_for_forward_and_backward_kernel(backend):
    """The fused kernel runs once per forward+backward (the backward adds only the elementwise scaling)."""
    require_backend("cuda", backend, "distill_kl_loss")
    s, t = _logits(11, 64, 1501, torch.bfloat16, "cuda")
    s.requires_grad_()
    with use_backend(backend):
        distill_kl_loss(s, t, 2.0).backward()  # warm-up: compilation
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            distill_kl_loss(s, t, 2.0).backward()
            torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert sum("distill_kl" in n for n in names) == 1, names


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_FUSED)
def test_gpu_cuda_graph_capture(backend):
    require_backend("cuda", backend, "distill_kl_loss")
    s, t = _logits(11, 64, 751, torch.bfloat16, "cuda")
    with use_backend(backend):
        out = distill_kl_loss(s, t, 2.0, reduction="none")  # warm-up outside capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = distill_kl_loss(s, t, 2.0, reduction="none")
        s.normal_()
        graph.replay()
        expected = distill_kl_loss(s, t, 2.0, reduction="none")
    assert not torch.equal(out, expected)
    torch.testing.assert_close(captured, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_FUSED)
def test_gpu_compile(backend):
    require_backend("cuda", backend, "distill_kl_loss")
    torch._dynamo.reset()
    s, t = _logits(11, 64, 751, torch.bfloat16, "cuda")
    w = torch.rand(11, device="cuda", requires_grad=True)
    with use_backend(backend):
        fn = torch.compile(lambda a, b, c: distill_kl_loss(a, b, 2.0, c), fullgraph=True)
        a1, a2 = s.clone().requires_grad_(), s.clone().requires_grad_()
        got, want = fn(a1, t, w), distill_kl_loss(a2, t, 2.0, w)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(torch.autograd.grad(got, a1)[0], torch.autograd.grad(want, a2)[0])


def test_triton_scalars_are_float64_in_the_signature():
    """1/T, T and the reduction factor reach the Triton kernel as float64 (a bare Python float compiles as a
    float32 scalar: float64 logits on a GPU were only float32-accurate). The interpreter passes Python floats
    through, so this checks the kernel's declared signature; scripts/gpu_compile_check.py checks the compiled one."""
    import inspect

    import triton.language as tl
    from amfor.kernels import distill_loss as kernels

    fn = getattr(kernels._distill_kl_kernel, "fn", kernels._distill_kl_kernel)
    annotations = {name: p.annotation for name, p in inspect.signature(fn).parameters.items()}
    for name in ("inv_temp", "temp", "factor"):
        assert annotations[name] in (tl.float64, "tl.float64"), (name, annotations[name])


@pytest.mark.gpu
def test_gpu_float64_is_float64_accurate():
    require_backend("cuda", "triton", "distill_kl_loss")
    s, t = _logits(3, 8, 751, torch.float64, "cuda")
    s.requires_grad_()
    want, (want_grad,) = _reference_grads(s, t, 1.7, None, "sum", torch.tensor(1.0, dtype=torch.float64),
                                          teacher_grad=False)
    with use_backend("triton"):
        got = distill_kl_loss(s, t, 1.7, reduction="sum")
        (grad,) = torch.autograd.grad(got, s)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-13)
