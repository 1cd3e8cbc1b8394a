"""masked_gather / masked_scatter / random_masking: every backend against the reference."""

import pytest
import torch

from amfor.ops import extension_status, masked_gather, masked_scatter, random_masking, use_backend
from amfor.ops import masked_patches as mp
from amfor.testing import assert_close_lowp, backends, devices, poisoned, require_backend

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CASES = [(128, 64, 0), (129, 192, 1), (210, 64, 105), (242, 768, 242), (242, 192, 181)]  # (N, D, K)
BACKEND_CASES = [(d, b) for d in devices() for b in backends(d)]
needs_ext = pytest.mark.skipif(not extension_status()[0], reason="amfor._C is not built")


def _batch(backend: str) -> int:
    return 1 if backend == "triton" and not torch.cuda.is_available() else 3  # the interpreter is slow


def _inputs(B, N, D, K, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g).to(device=device, dtype=dtype)
    pos = torch.randn(N, D, generator=g).to(device=device, dtype=dtype)
    index, _ = random_masking(B, N, K, generator=g)
    return x, pos, index.to(device)


# ---------------------------------------------------------------------------------------------------------
# Reference semantics
# ---------------------------------------------------------------------------------------------------------
def test_reference_hand_cases():
    x = torch.arange(2 * 4 * 2, dtype=torch.float32).reshape(2, 4, 2)  # x[b, n] = [8b + 2n, 8b + 2n + 1]
    pos = torch.tensor([[100.0, 200.0], [300.0, 400.0], [500.0, 600.0], [700.0, 800.0]])
    index = torch.tensor([[3, 0], [1, 1]])
    out = mp.masked_gather_reference(x, index, pos)
    expected = torch.tensor([[[706.0, 807.0], [100.0, 201.0]], [[310.0, 411.0], [310.0, 411.0]]])
    torch.testing.assert_close(out, expected)

    y = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]])
    token = torch.tensor([-1.0, -2.0])
    full = mp.masked_scatter_reference(y, torch.tensor([[2], [0]]), 3, token, pos[:3])
    expected = torch.tensor([[[99.0, 198.0], [299.0, 398.0], [501.0, 602.0]],
                             [[103.0, 204.0], [299.0, 398.0], [499.0, 598.0]]])
    torch.testing.assert_close(full, expected)


def test_gather_backward_sums_repeated_indices():
    grad = torch.tensor([[[1.0], [2.0], [4.0]]])
    out = mp.masked_gather_backward_reference(grad, torch.tensor([[2, 0, 2]]), 4)
    torch.testing.assert_close(out, torch.tensor([[[2.0], [0.0], [5.0], [0.0]]]))


def test_random_masking_uniform():
    g = torch.Generator().manual_seed(3)
    index, mask = random_masking(5, 242, 60, generator=g)
    assert index.shape == (5, 60) and mask.shape == (5, 242) and index.dtype == torch.int64
    assert (index[:, 1:] > index[:, :-1]).all(), "kept indices ascend and are unique"
    assert (mask.sum(1) == 242 - 60).all()
    assert not mask.gather(1, index).any(), "kept tokens are not masked"
    again, _ = random_masking(5, 242, 60, generator=torch.Generator().manual_seed(3))
    assert torch.equal(index, again), "the same generator seed gives the same choice"
    assert len({tuple(r.tolist()) for r in index}) == 5, "rows draw independently"


def test_random_masking_keeps_lowest_scores_with_stable_ties():
    scores = torch.tensor([[0.5, 0.1, 0.1, 0.9, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    index, mask = random_masking(2, 5, 3, scores=scores)
    assert index[0].tolist() == [1, 2, 4] and index[1].tolist() == [0, 1, 2]
    assert mask.tolist() == [[True, False, False, True, False], [False, False, False, True, True]]


@pytest.mark.parametrize("keep", [-1, 6])
def test_random_masking_rejects_bad_keep(keep):
    with pytest.raises(ValueError, match="num_keep"):
        random_masking(2, 5, keep)


# ---------------------------------------------------------------------------------------------------------
# Every backend against the reference
# ---------------------------------------------------------------------------------------------------------
def _check_gather(backend, device, N, D, K, dtype, index_dtype=torch.int64, seed=0):
    B = _batch(backend)
    x, pos, index = _inputs(B, N, D, K, dtype, device, seed)
    index = index.to(index_dtype)
    x.requires_grad_(True)
    pos.requires_grad_(True)
    with use_backend(backend), poisoned():
        out = masked_gather(x, index, pos)
        grad = torch.randn_like(out)
        gx, gp = torch.autograd.grad(out, (x, pos), grad, allow_unused=True)
    x32, pos32 = x.detach().float().requires_grad_(), pos.detach().float().requires_grad_()
    ref = mp.masked_gather_reference(x32, index, pos32)
    rx, rp = torch.autograd.grad(ref, (x32, pos32), grad.float())
    low = mp.masked_gather_reference(x.detach(), index, pos.detach())
    assert_close_lowp(out, ref, low, name="out")
    assert_close_lowp(gx, rx, rx.to(dtype), name="grad x")
    assert_close_lowp(gp, rp, rp.to(dtype), floor=1e-2 if dtype != torch.float32 else 1e-5, name="grad pos_embed")


def _check_scatter(backend, device, N, D, K, dtype, seed=1):
    B = _batch(backend)
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(B, K, D, generator=g).to(device=device, dtype=dtype).requires_grad_()
    token = torch.randn(D, generator=g).to(device=device, dtype=dtype).requires_grad_()
    pos = torch.randn(N, D, generator=g).to(device=device, dtype=dtype).requires_grad_()
    index = random_masking(B, N, K, generator=g)[0].to(device)
    with use_backend(backend), poisoned():
        out = masked_scatter(y, index, N, token, pos)
        grad = torch.randn_like(out)
        grads = torch.autograd.grad(out, (y, token, pos), grad)
    leaves = [t.detach().float().requires_grad_() for t in (y, token, pos)]
    ref = mp.masked_scatter_reference(leaves[0], index, N, leaves[1], leaves[2])
    ref_grads = torch.autograd.grad(ref, leaves, grad.float())
    low = mp.masked_scatter_reference(y.detach(), index, N, token.detach(), pos.detach())
    assert_close_lowp(out, ref, low, name="out")
    floor = 1e-5 if dtype == torch.float32 else 5e-2  # sums of B*N gradient rows, rounded once to dtype
    for name, got, want in zip(("grad y", "grad mask_token", "grad pos_embed"), grads, ref_grads, strict=True):
        assert_close_lowp(got, want, want.to(dtype), floor=floor, name=name)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference_gather(device, backend, dtype):
    cases = CASES if backend != "triton" or device == "cuda" else CASES[:1] + CASES[3:4]
    for N, D, K in cases:
        _check_gather(backend, device, N, D, K, dtype)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference_scatter(device, backend, dtype):
    cases = CASES if backend != "triton" or device == "cuda" else CASES[1:2] + CASES[4:5]
    for N, D, K in cases:
        _check_scatter(backend, device, N, D, K, dtype)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_int32_index_and_repeated_indices(device, backend):
    _check_gather(backend, device, 129, 64, 40, torch.float32, index_dtype=torch.int32)
    x = torch.randn(2, 9, 64, device=device, requires_grad=True)
    index = torch.tensor([[4, 4, 0, 8, 4], [1, 1, 1, 1, 1]], device=device)
    with use_backend(backend):
        out = masked_gather(x, index)
        grad = torch.randn_like(out)
        (gx,) = torch.autograd.grad(out, x, grad)
    torch.testing.assert_close(gx, mp.masked_gather_backward_reference(grad, index, 9))


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_non_contiguous_inputs(device, backend):
    x = torch.randn(20, 2, 64, device=device).transpose(0, 1)  # [2, 20, 64], not contiguous
    pos = torch.randn(64, 20, device=device).t()
    index = random_masking(2, 20, 7)[0].to(device)[:, :7]
    y = torch.randn(7, 2, 64, device=device).transpose(0, 1)
    token = torch.randn(64, 2, device=device)[:, 0]
    with use_backend(backend):
        out = masked_gather(x, index, pos)
        full = masked_scatter(y, index, 20, token, pos)
    torch.testing.assert_close(out, mp.masked_gather_reference(x, index, pos))
    torch.testing.assert_close(full, mp.masked_scatter_reference(y, index, 20, token, pos))


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_empty_batches(device, backend):
    """Zero images, and images that keep no token."""
    x = torch.randn(0, 12, 64, device=device)
    idx = torch.zeros(0, 5, dtype=torch.long, device=device)
    with use_backend(backend):
        assert masked_gather(x, idx).shape == (0, 5, 64)
        y = torch.randn(2, 0, 64, device=device)
        token = torch.randn(64, device=device)
        full = masked_scatter(y, torch.zeros(2, 0, dtype=torch.long, device=device), 12, token)
    torch.testing.assert_close(full, token.expand(2, 12, 64))


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_no_kept_tokens_gives_zero_gradient(device, backend):
    x = torch.randn(2, 12, 64, device=device, requires_grad=True)
    pos = torch.randn(12, 64, device=device, requires_grad=True)
    with use_backend(backend), poisoned():
        out = masked_gather(x, torch.zeros(2, 0, dtype=torch.long, device=device), pos)
        gx, gp = torch.autograd.grad(out, (x, pos), torch.ones_like(out))
    assert out.shape == (2, 0, 64)
    assert torch.equal(gx, torch.zeros_like(x)) and torch.equal(gp, torch.zeros_like(pos))


@pytest.mark.parametrize("backend", [b for b in backends("cpu") if b != "torch"])
@pytest.mark.slow
def test_gradcheck_float64(backend):
    x = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([[5, 0, 5], [2, 3, 1]])
    y = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    token = torch.randn(4, dtype=torch.float64, requires_grad=True)
    unique = torch.tensor([[5, 0, 4], [2, 3, 1]])
    with use_backend(backend):
        assert torch.autograd.gradcheck(lambda a, p: masked_gather(a, index, p), (x, pos))
        assert torch.autograd.gradcheck(lambda a, t, p: masked_scatter(a, unique, 6, t, p), (y, token, pos))


# ---------------------------------------------------------------------------------------------------------
# torch.library registration: opcheck and torch.compile
# ---------------------------------------------------------------------------------------------------------
def _op_names():
    names = ["masked_gather_triton", "masked_scatter_triton", "masked_gather_backward_triton"]
    if extension_status()[0]:
        names += ["masked_gather", "masked_scatter", "masked_gather_backward"]
    return names


@pytest.mark.parametrize("name", _op_names())
def test_opcheck(name):
    op = getattr(torch.ops.amfor, name)
    x = torch.randn(2, 6, 8, requires_grad=True)
    pos = torch.randn(6, 8, requires_grad=True)
    index = torch.tensor([[5, 0, 3], [2, 3, 1]])
    if name.startswith("masked_gather_backward"):
        args = (torch.randn(2, 3, 8), torch.tensor([[5, 0, 5], [2, 3, 1]]), 6)
    elif name.startswith("masked_gather"):
        args = (x, index, pos)
    else:
        args = (torch.randn(2, 3, 8, requires_grad=True), index, 6, torch.randn(8, requires_grad=True), pos)
    if "triton" in name:  # the interpreter is slow: the schema, fake and autograd checks
        tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    else:
        tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(op, args, test_utils=tests)


@pytest.mark.parametrize("backend", backends("cpu"))
@pytest.mark.slow
def test_compile_fullgraph(backend):
    torch._dynamo.reset()

    def step(x, index, pos, token):
        kept = masked_gather(x, index, pos, check_index=False)
        return masked_scatter(kept * 2, index, x.shape[1], token, pos, check_index=False)

    x, pos, index = _inputs(2, 12, 16, 5, torch.float32, "cpu")
    token = torch.randn(16)
    with use_backend(backend):
        compiled = torch.compile(step, fullgraph=True)
        torch.testing.assert_close(compiled(x, index, pos, token), step(x, index, pos, token))


# ---------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backends("cpu"))
def test_bad_inputs(backend):
    x = torch.randn(2, 10, 8)
    index = torch.tensor([[0, 3], [1, 9]])
    with use_backend(backend):
        with pytest.raises(ValueError, match="x must be"):
            masked_gather(x[0], index)
        with pytest.raises(TypeError, match="floating-point"):
            masked_gather(x.long(), index)
        with pytest.raises(TypeError, match="index must be an int32 or int64"):
            masked_gather(x, index.float())
        with pytest.raises(ValueError, match="index must be"):
            masked_gather(x, index[:1])
        with pytest.raises(ValueError, match=r"index values must lie in \[0, 10\)"):
            masked_gather(x, torch.tensor([[0, 10], [1, 2]]))
        with pytest.raises(ValueError, match=r"index values"):
            masked_gather(x, torch.tensor([[0, -1], [1, 2]]))
        with pytest.raises(ValueError, match="pos_embed must be"):
            masked_gather(x, index, torch.randn(9, 8))
        with pytest.raises(ValueError, match="index is on meta"):
            masked_gather(x, index.to("meta"))
        y = torch.randn(2, 2, 8)
        with pytest.raises(ValueError, match="unique"):
            masked_scatter(y, torch.tensor([[3, 3], [1, 2]]), 10, torch.zeros(8))
        with pytest.raises(ValueError, match="mask_token"):
            masked_scatter(y, index, 10, torch.zeros(7))
        with pytest.raises(ValueError, match="num_tokens"):
            masked_scatter(y, index, 1, torch.zeros(8))


@needs_ext
def test_direct_op_call_checks_inputs():
    """The C++ kernels check the index range themselves, so a direct torch.ops call cannot read out of bounds."""
    with pytest.raises(RuntimeError, match="index values must lie"):
        torch.ops.amfor.masked_gather(torch.randn(1, 4, 2), torch.tensor([[4]]), None)
    with pytest.raises(RuntimeError, match="unique"):
        torch.ops.amfor.masked_scatter(torch.randn(1, 2, 2), torch.tensor([[1, 1]]), 4, torch.zeros(2), None)


def test_forced_unavailable_backend_names_what_is_missing():
    with use_backend("cuda"), pytest.raises(RuntimeError, match="cuda.*cannot run masked_gather on cpu"):
        masked_gather(torch.randn(1, 4, 2), torch.tensor([[1]]))


# ---------------------------------------------------------------------------------------------------------
# GPU tier
# ---------------------------------------------------------------------------------------------------------
GPU_FUSED = ["cuda", "triton"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_FUSED)
def test_gpu_backward_is_deterministic(backend):
    require_backend("cuda", backend, "masked_gather")
    x = torch.randn(8, 242, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    index = torch.randint(0, 242, (8, 300), device="cuda")  # many repeats
    grad = torch.randn(8, 300, 768, device="cuda", dtype=torch.bfloat16)
    with use_backend(backend):
        first = torch.autograd.grad(masked_gather(x, index), x, grad)[0]
        second = torch.autograd.grad(masked_gather(x, index), x, grad)[0]
    assert torch.equal(first, second)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_FUSED)
def test_gpu_cuda_graph_capture(backend):
    require_backend("cuda", backend, "masked_scatter")
    x, pos, index = _inputs(4, 242, 768, 121, torch.bfloat16, "cuda")
    token = torch.randn(768, device="cuda", dtype=torch.bfloat16)
    with use_backend(backend):
        out = masked_scatter(masked_gather(x, index, pos), index, 242, token, pos)  # warm-up outside capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = masked_scatter(masked_gather(x, index, pos), index, 242, token, pos)
        x.normal_()
        graph.replay()
        expected = masked_scatter(masked_gather(x, index, pos), index, 242, token, pos)
    assert not torch.equal(out, expected)
    torch.testing.assert_close(captured, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_FUSED)
def test_gpu_compile(backend):
    require_backend("cuda", backend, "masked_gather")
    torch._dynamo.reset()
    x, pos, index = _inputs(4, 242, 768, 121, torch.bfloat16, "cuda")
    with use_backend(backend):
        fn = torch.compile(lambda a, i, p: masked_gather(a, i, p, check_index=False).float().sum(-1), fullgraph=True)
        torch.testing.assert_close(fn(x, index, pos), masked_gather(x, index, pos).float().sum(-1))


@pytest.mark.gpu
def test_gpu_direct_cuda_call_with_bad_index_keeps_the_context():
    """An out-of-range index in a direct call of the CUDA masked_scatter must not trip a device-side assert
    (which poisons the CUDA context for the rest of the process): the row is dropped, the call returns."""
    require_backend("cuda", "cuda", "masked_scatter")
    y = torch.randn(2, 3, 64, device="cuda")
    token = torch.randn(64, device="cuda")
    index = torch.tensor([[0, 5, 99], [-7, 1, 2]], device="cuda")
    out = torch.ops.amfor.masked_scatter(y, index, 6, token, None)
    torch.cuda.synchronize()
    want = token.expand(2, 6, 64).clone()
    want[0, 0], want[0, 5], want[1, 1], want[1, 2] = y[0, 0], y[0, 1], y[1, 1], y[1, 2]
    torch.testing.assert_close(out, want)
    gathered = torch.ops.amfor.masked_gather(y, torch.tensor([[0, 7], [1, -1]], device="cuda"), None)
    torch.cuda.synchronize()
    torch.testing.assert_close(gathered[0, 0], y[0, 0])
    assert (torch.ones(3, device="cuda") + 1).sum().item() == 6  # the context still works
