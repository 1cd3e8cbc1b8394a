"""query_fusion_attention: reference, Triton, C++ CPU and CUDA kernels against the reference."""

import math

import pytest
import torch

import amfor.ops as ops
from amfor.ops import use_backend
from amfor.ops.query_fusion import query_fusion_attention, query_fusion_attention_reference
from amfor.testing import assert_close_lowp, backends, devices, poisoned, require_backend

COMPILED = ["cpp", "cuda", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _cases():
    """(device, backend) pairs of every compiled backend that runs here."""
    return [(dev, b) for dev in devices() for b in backends(dev) if b in COMPILED]


def _inputs(B=2, H=4, Hkv=2, Q=5, L=3, N=37, d=40, dtype=torch.float32, device="cpu", mask=None, weights="bql",
            seed=0):
    """Fresh random q, k, v (float32 leaves cast to dtype), layer weights and mask."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Q, d, generator=g).to(device, dtype)
    k = torch.randn(B, Hkv, L, N, d, generator=g).to(device, dtype)
    v = torch.randn(B, Hkv, L, N, d, generator=g).to(device, dtype)
    shapes = {"none": None, "l": (L,), "bl": (B, L), "bql": (B, Q, L)}[weights]
    w = None if shapes is None else torch.rand(*shapes, generator=g).to(device) + 0.1
    m = None
    if mask is not None:
        m = (torch.rand(B, Q if mask == "bq" else 1, L, N, generator=g) > 0.4).to(device)
        m[0, 0, -1] = False  # a fully masked (query, layer)
    return q, k, v, w, m


def _run(backend, q, k, v, w, m, grad, scale=None):
    """Output and gradients of (q, k, v, w) with `backend`."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (q, k, v, w)]
    with use_backend(backend):
        out = query_fusion_attention(leaves[0], leaves[1], leaves[2], leaves[3], m, scale)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], grad)
    return out.detach(), list(grads)


def _reference(q, k, v, w, m, grad, upcast=True, scale=None):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (q, k, v, w)]
    if upcast:
        leaves = [t.float().detach().requires_grad_() if t is not None else None for t in leaves]
    out = query_fusion_attention_reference(*leaves, m, scale, upcast=upcast)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], grad.to(out.dtype))
    return out.detach(), list(grads)


def _compare(backend, q, k, v, w, m, scale=None):
    """Forward and all gradients of `backend` vs the float32 reference, by the low-precision rule."""
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to(q.device, q.dtype)
    with poisoned():
        out, grads = _run(backend, q, k, v, w, m, grad, scale)
    ref, ref_grads = _reference(q, k, v, w, m, grad, scale=scale)
    low, low_grads = (None, [None] * 4) if q.dtype == torch.float32 else _reference(q, k, v, w, m, grad, False, scale)
    tol = dict(floor=2e-5, rtol=2e-5) if q.dtype == torch.float32 else dict(floor=1e-3)
    assert_close_lowp(out, ref.to(q.dtype) if q.dtype == torch.float32 else ref, low, name="out", **tol)
    for name, a, r, lo in zip("qkvw", grads, ref_grads, low_grads, strict=False):
        if name == "w":  # layer weights stay float32
            torch.testing.assert_close(a.float(), r, rtol=2e-2 if q.dtype != torch.float32 else 2e-5, atol=1e-3)
            continue
        r = r.to(q.dtype) if q.dtype == torch.float32 else r
        assert_close_lowp(a, r, lo, name=f"d{name}", **tol)


# ---------------------------------------------------------------------------------------------------------
# Reference against hand-derived cases and PyTorch attention
# ---------------------------------------------------------------------------------------------------------
def test_reference_hand_cases():
    # one query, two keys with scaled scores 0 and ln 3: probabilities 1/4 and 3/4
    q = torch.tensor([[[[1.0, 0.0]]]])
    k = torch.tensor([[[[[0.0, 0.0], [math.log(3.0), 5.0]]]]])
    v = torch.tensor([[[[[4.0, 8.0], [0.0, 4.0]]]]])
    out = query_fusion_attention_reference(q, k, v, scale=1.0)
    torch.testing.assert_close(out, torch.tensor([[[[1.0, 5.0]]]]))
    # two layers, weights 0.25 / 0.75, the second layer fully masked: 0.25 * layer 0 only
    k2, v2 = torch.cat([k, k], 2), torch.cat([v, 2 * v], 2)
    mask = torch.tensor([[[[True, True], [False, False]]]])
    out = query_fusion_attention_reference(q, k2, v2, torch.tensor([0.25, 0.75]), mask, scale=1.0)
    torch.testing.assert_close(out, torch.tensor([[[[0.25, 1.25]]]]))
    # no weights: the mean of the layers
    out = query_fusion_attention_reference(q, k2, v2, scale=1.0)
    torch.testing.assert_close(out, torch.tensor([[[[1.5, 7.5]]]]))


def test_reference_is_sdpa_for_one_layer_and_shared_heads():
    q, k, v, _, _ = _inputs(H=4, Hkv=2, L=1)
    expect = torch.nn.functional.scaled_dot_product_attention(
        q, k[:, :, 0].repeat_interleave(2, 1), v[:, :, 0].repeat_interleave(2, 1))
    torch.testing.assert_close(query_fusion_attention_reference(q, k, v), expect, rtol=1e-5, atol=1e-5)


def test_reference_gradcheck_float64():
    q, k, v, w, m = _inputs(B=1, H=2, Hkv=1, Q=2, L=2, N=5, d=3, mask="bq")
    args = [t.double().requires_grad_() for t in (q, k, v, w)]
    assert torch.autograd.gradcheck(lambda *a: query_fusion_attention_reference(*a, m), args)


@pytest.mark.skipif("cpp" not in backends("cpu"), reason="amfor._C not built")
@pytest.mark.parametrize("mask", [None, "bq"])
def test_gradcheck_float64(mask):
    q, k, v, w, m = _inputs(B=1, H=2, Hkv=1, Q=2, L=2, N=5, d=3, mask=mask)
    args = [t.double().requires_grad_() for t in (q, k, v, w)]
    with use_backend("cpp"):
        assert torch.autograd.gradcheck(lambda *a: query_fusion_attention(*a, m), args)


# ---------------------------------------------------------------------------------------------------------
# Every compiled backend against the reference
# ---------------------------------------------------------------------------------------------------------
SHAPES = [  # (B, H, Hkv, Q, L, N, d)
    (2, 4, 2, 5, 3, 37, 40),
    (1, 2, 2, 1, 1, 129, 32),
    (2, 3, 1, 7, 2, 19, 64),
    (1, 2, 1, 10, 1, 211, 16),
    (2, 6, 2, 3, 2, 11, 13),  # G Q = 9 rows: a full and a 1-row block; tail tokens; d % 8, d % 16 tail columns
]


@pytest.mark.parametrize("device,backend", _cases())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(device, backend, shape):
    B, H, Hkv, Q, L, N, d = shape
    _compare(backend, *_inputs(B, H, Hkv, Q, L, N, d, device=device, mask="bq"))


@pytest.mark.parametrize("device,backend", _cases())
@pytest.mark.parametrize("dtype", DTYPES[1:])
def test_matches_reference_low_precision(device, backend, dtype):
    _compare(backend, *_inputs(B=2, H=4, Hkv=2, Q=6, L=2, N=53, d=48, dtype=dtype, device=device, mask="b1"))


@pytest.mark.parametrize("device,backend", _cases())
@pytest.mark.parametrize("weights", ["none", "l", "bl", "bql"])
def test_layer_weight_shapes(device, backend, weights):
    _compare(backend, *_inputs(B=2, H=2, Hkv=2, Q=3, L=3, N=21, d=32, device=device, weights=weights))


@pytest.mark.parametrize("device,backend", _cases())
@pytest.mark.parametrize("mask", ["bq", "b1"])
def test_masks_and_fully_masked_layers(device, backend, mask):
    q, k, v, w, m = _inputs(B=2, H=2, Hkv=1, Q=4, L=2, N=23, d=32, device=device, mask=mask)
    m[1] = False  # image 1: every key of every layer masked -> zero output, zero gradient, no NaN
    _compare(backend, q, k, v, w, m)
    out, grads = _run(backend, q, k, v, w, m, torch.ones_like(q))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert (out[1] == 0).all() and (grads[0][1] == 0).all() and (grads[1][1] == 0).all() and (grads[3][1] == 0).all()


@pytest.mark.parametrize("device,backend", _cases())
def test_large_head_dim_shared_kv(device, backend):
    """The projection-absorbed shape: all heads share one key/value head of width d = D > 128 (tiled)."""
    q, k, v, w, m = _inputs(B=1, H=3, Hkv=1, Q=4, L=2, N=45, d=200, device=device, mask="bq")
    _compare(backend, q, k, k, w, m, scale=0.1)


@pytest.mark.parametrize("device,backend", _cases())
def test_non_contiguous_inputs(device, backend):
    """Separately allocated layers (a list), then non-contiguous q, k, v."""
    q, k, v, w, _ = _inputs(B=2, H=2, Hkv=2, Q=3, L=3, N=17, d=32, device=device)
    ks = [k[:, :, i].clone() for i in range(3)]  # separately allocated layers: nothing stacked
    vs = [v[:, :, i].clone() for i in range(3)]
    grad = torch.randn_like(q)
    ref, ref_grads = _reference(q, k, v, w, None, grad)
    leaves = [t.detach().clone().requires_grad_() for t in (q, *ks, *vs, w)]
    with use_backend(backend):
        out = query_fusion_attention(leaves[0], leaves[1:4], leaves[4:7], leaves[7])
    grads = torch.autograd.grad(out, leaves, grad)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(torch.stack(grads[1:4], 2), ref_grads[1], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(torch.stack(grads[4:7], 2), ref_grads[2], rtol=2e-5, atol=2e-5)
    # non-contiguous: q transposed in memory, k a head-split view of a projection, v strided in d
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    kt = k.permute(0, 2, 3, 1, 4).contiguous().permute(0, 3, 1, 2, 4)
    vt = torch.cat([v, v], -1)[..., ::2]
    with use_backend(backend):
        out = query_fusion_attention(qt, kt, vt, w)
    torch.testing.assert_close(out, query_fusion_attention_reference(q, k, torch.cat([v, v], -1)[..., ::2], w),
                               rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("device,backend", _cases())
def test_keys_stacked_values_listed_and_the_reverse(device, backend):
    """k and v may come in different forms; each gradient comes back in its input's form."""
    q, k, v, w, _ = _inputs(B=2, H=2, Hkv=1, Q=3, L=2, N=11, d=32, device=device)
    grad = torch.randn_like(q)
    ref, ref_grads = _reference(q, k, v, w, None, grad)
    for k_listed in (False, True):
        kk = [k[:, :, i].clone().requires_grad_() for i in range(2)] if k_listed else k.clone().requires_grad_()
        vv = v.clone().requires_grad_() if k_listed else [v[:, :, i].clone().requires_grad_() for i in range(2)]
        k_leaves = kk if k_listed else [kk]
        v_leaves = [vv] if k_listed else vv
        with use_backend(backend):
            out = query_fusion_attention(q, kk, vv, w)
        grads = torch.autograd.grad(out, [*k_leaves, *v_leaves], grad)
        dk = torch.stack(grads[:2], 2) if k_listed else grads[0]
        dv = grads[-1] if k_listed else torch.stack(grads[1:], 2)
        torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(dk, ref_grads[1], rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(dv, ref_grads[2], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("device,backend", _cases())
def test_empty_batches(device, backend):
    q, k, v, w, _ = _inputs(B=0, device=device)
    with use_backend(backend):
        out = query_fusion_attention(q.requires_grad_(), k, v, None)
    assert out.shape == q.shape
    out.sum().backward()


def _op_name(backend: str, backward: bool = False) -> str:
    return "query_fusion_attention" + ("_backward" if backward else "") + ("_triton" if backend == "triton" else "")


@pytest.mark.parametrize("device,backend", _cases())
@pytest.mark.parametrize("mask", [None, "bq", "b1"])
def test_zero_head_dim_gives_a_defined_lse(device, backend, mask):
    """Head dim 0: every scaled score is 0, so lse = log(number of keys the row may attend), -inf for none;
    never uninitialised memory (the CUDA and C++ forwards returned torch.empty's contents)."""
    q, k, v, w, m = _inputs(B=2, H=2, Hkv=1, Q=3, L=2, N=5, d=0, device=device, mask=mask)
    if m is not None:
        m[1, :, 1] = False
    weights = torch.softmax(torch.rand(2, 3, 2, device=device), -1)
    with poisoned():
        out, lse = getattr(torch.ops.amfor, _op_name(backend))(q, [k], [v], weights, m, 1.0)
    count = (m.sum(-1, dtype=torch.float32) if m is not None else torch.full((2, 1, 2), 5.0, device=device))
    assert out.shape == q.shape and lse.shape == (2, 2, 3, 2)
    torch.testing.assert_close(lse, count.log()[:, None].expand(2, 2, 3, 2))


# ---------------------------------------------------------------------------------------------------------
# torch.library: opcheck, torch.compile
# ---------------------------------------------------------------------------------------------------------
def _op_args(device, dtype=torch.float32):
    q, k, v, w, m = _inputs(B=2, H=2, Hkv=1, Q=3, L=2, N=19, d=32, dtype=dtype, device=device, mask="bq")
    return q.requires_grad_(), [k.requires_grad_()], [v.requires_grad_()], w.requires_grad_(), m, 0.2


@pytest.mark.parametrize("device,backend", _cases())
def test_opcheck(device, backend):
    name = _op_name(backend)
    args = _op_args(device)
    torch.library.opcheck(getattr(torch.ops.amfor, name).default, args)
    q, k, v, w, m, scale = args
    out, lse = getattr(torch.ops.amfor, name)(q, k, v, w, m, scale)
    bwd = _op_name(backend, backward=True)
    torch.library.opcheck(getattr(torch.ops.amfor, bwd).default,
                          (torch.randn_like(out), q.detach(), [k[0].detach()], [v[0].detach()], w.detach(), m, scale,
                           lse.detach()))


@pytest.mark.parametrize("backend", ["torch", *[b for b in backends("cpu") if b in COMPILED]])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    q, k, v, w, m = _inputs(B=2, H=2, Hkv=2, Q=3, L=2, N=19, d=32, mask="bq")

    def fn(q, k, v, w):
        with use_backend(backend):
            return query_fusion_attention(q, k, v, w, m)

    leaves = [t.clone().requires_grad_() for t in (q, k, v, w)]
    out = torch.compile(fn, fullgraph=True)(*leaves)
    out.sum().backward()
    ref = query_fusion_attention_reference(q, k, v, w, m)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------
def _bad(**over):
    q, k, v, w, m = _inputs(B=2, H=4, Hkv=2, Q=3, L=2, N=7, d=16, mask="bq")
    args = dict(q=q, k=k, v=v, layer_weights=w, attn_mask=m)
    args.update(over)
    return args


@pytest.mark.parametrize("over,error,match", [
    (dict(q=torch.randn(2, 4, 16)), ValueError, "q must be"),
    (dict(q=torch.randint(0, 3, (2, 4, 3, 16))), TypeError, "q must be float"),
    (dict(k=torch.randn(2, 3, 2, 7, 16)), ValueError, "must divide"),
    (dict(k=torch.randn(2, 2, 2, 7, 8)), ValueError, "k must have shape"),
    (dict(v=torch.randn(2, 2, 2, 8, 16)), ValueError, "v must have shape|same heads"),
    (dict(k=torch.randn(2, 2, 2, 7, 16, dtype=torch.float64)), TypeError, "k has dtype"),
    (dict(k=[]), TypeError, "non-empty list"),
    (dict(layer_weights=torch.rand(3)), ValueError, "layer_weights must be"),
    (dict(attn_mask=torch.ones(2, 3, 2, 7)), TypeError, "attn_mask must be a bool"),
    (dict(attn_mask=torch.ones(2, 2, 2, 7, dtype=torch.bool)), ValueError, "attn_mask must be"),
    (dict(k=torch.randn(2, 2, 2, 7, 16, device="meta")), ValueError, "k is on meta"),
])
def test_bad_inputs(over, error, match):
    with pytest.raises(error, match=match):
        query_fusion_attention(**_bad(**over))


@pytest.mark.parametrize("device,backend", [(d, b) for d in devices() for b in backends(d)])
def test_autocast_runs_mixed_dtypes_in_the_autocast_dtype(device, backend):
    """A model under autocast hands the op bfloat16 queries (a linear layer) and float32 keys (a LayerNorm)."""
    q, k, v, w, m = _inputs(B=2, H=2, Hkv=1, Q=3, L=2, N=19, d=16, device=device, mask="b1")
    keys, values = list(k.unbind(2)), list(v.unbind(2))
    with pytest.raises(TypeError, match="k\\[0\\] has dtype"):  # outside autocast a mix is an error
        query_fusion_attention(q.bfloat16(), keys, values, w, m)
    qb = q.bfloat16().requires_grad_()
    with use_backend(backend), torch.autocast(device, dtype=torch.bfloat16):
        out = query_fusion_attention(qb, keys, values, w, m)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert qb.grad is not None and bool(torch.isfinite(qb.grad).all())
    ref = query_fusion_attention_reference(qb.detach().float(), k, v, w, m)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("device,backend", _cases())
def test_bad_inputs_for_kernels(device, backend):
    q = torch.randn(1, 1, 2, 1100, device=device)
    k = torch.randn(1, 1, 1, 3, 1100, device=device)
    with use_backend(backend), pytest.raises(ValueError, match="head dims up to"):
        query_fusion_attention(q, k, k)
    if backend == "triton":
        q, k = q[..., :16].double(), k[..., :16].double()
        with use_backend(backend), pytest.raises(TypeError, match="float64"):
            query_fusion_attention(q, k, k)


def test_direct_op_call_checks_inputs():
    if not ops.has_kernel("query_fusion_attention", "cpu"):
        pytest.skip("amfor._C not built")
    q, k, v, w, _ = _inputs(B=2, H=2, Hkv=2, Q=3, L=2, N=7, d=16)
    with pytest.raises(RuntimeError, match="weights must be"):
        torch.ops.amfor.query_fusion_attention(q, [k], [v], w[:, :, :1].contiguous(), None, 1.0)


def test_forced_unavailable_backend_names_what_is_missing():
    q, k, v, _, _ = _inputs(B=1, H=1, Hkv=1, Q=1, L=1, N=3, d=8)
    with use_backend("cuda"), pytest.raises(RuntimeError, match="cuda.*cannot run query_fusion_attention on cpu"):
        query_fusion_attention(q, k, v)


# ---------------------------------------------------------------------------------------------------------
# Triton launch details a CPU can check: tiles within the device's shared memory, the layer offset table
# ---------------------------------------------------------------------------------------------------------
def test_tiles_fit_the_devices_shared_memory(monkeypatch):
    """float32 at head dim 128 took 64 rows (~104 KiB of shared memory): more than sm_86/sm_89's 99 KiB."""
    from amfor.kernels import _launch
    from amfor.kernels import query_fusion as kernels

    q = torch.empty(1, 8, 10, 128)
    for limit, rows in ((99 * 1024, 32), (163 * 1024, 64), (227 * 1024, 64)):
        monkeypatch.setattr(_launch, "TARGET_SHARED_MEMORY", limit)
        blocks = kernels._blocks(80, 128, q)
        assert blocks["BLOCK_M"] == rows, (limit, blocks)
        for d in (16, 64, 128, 200, 768):
            b = kernels._blocks(80, d, q)
            assert kernels._smem_estimate(b["BLOCK_M"], b["BLOCK_N"], b["BLOCK_DK"], 4) <= limit, (limit, d, b)


def test_layer_list_offsets_need_no_blocking_copy():
    """Separately allocated layers: their offset table is copied without a host sync (non_blocking, pinned on
    CUDA) once per set of offsets, then reused, so the call is sync-free and CUDA-graph capturable."""
    from amfor.kernels import query_fusion as kernels
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.copies = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
                self.copies.append(kwargs.get("non_blocking", args[2] if len(args) > 2 else False))
            return func(*args, **kwargs)

    offsets = (0, 7168, -3072, 111104)
    with Copies() as first:
        table = kernels.offset_table(offsets, torch.device("meta"))
    assert first.copies == [True], first.copies
    assert table.shape == (4,) and table.dtype == torch.int64 and table.device.type == "meta"
    with Copies() as again:
        assert kernels.offset_table(offsets, torch.device("meta")) is table
    assert again.copies == []
    torch.testing.assert_close(kernels.offset_table(offsets, torch.device("cpu")), torch.tensor(offsets))


# ---------------------------------------------------------------------------------------------------------
# GPU only: compile, CUDA graphs, deterministic backward
# ---------------------------------------------------------------------------------------------------------
GPU_FUSED = ["triton", "cuda"]


def _gpu_inputs(dtype=torch.bfloat16):
    return _inputs(B=4, H=12, Hkv=12, Q=10, L=4, N=211, d=64, dtype=dtype, device="cuda", mask="bq")


def _gpu_step(backend, m):
    def step(q, k, v, w):
        with use_backend(backend):
            return query_fusion_attention(q, k, v, w, m)

    return step


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_FUSED)
def test_gpu_backward_is_deterministic(backend):
    require_backend("cuda", backend, "query_fusion_attention")
    q, k, v, w, m = _gpu_inputs()
    grad = torch.randn_like(q)
    runs = [_run(backend, q, k, v, w, m, grad) for _ in range(2)]
    for a, b in zip([runs[0][0], *runs[0][1]], [runs[1][0], *runs[1][1]], strict=True):
        assert torch.equal(a, b), "backward is not bitwise deterministic"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_FUSED)
def test_gpu_compile(backend):
    require_backend("cuda", backend, "query_fusion_attention")
    torch._dynamo.reset()
    q, k, v, w, m = _gpu_inputs()
    step = _gpu_step(backend, m)
    torch.testing.assert_close(torch.compile(step, fullgraph=True)(q, k, v, w), step(q, k, v, w))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_FUSED)
@pytest.mark.parametrize("layers", ["stacked", "list"])
def test_gpu_cuda_graph_capture(backend, layers):
    """Captured and replayed on new inputs; separately allocated layers (a list) included (their offsets)."""
    require_backend("cuda", backend, "query_fusion_attention")
    q, k, v, w, m = _gpu_inputs()
    if layers == "list":
        k, v = [t.clone() for t in k.unbind(2)], [t.clone() for t in v.unbind(2)]
    step = _gpu_step(backend, m)
    static_q = q.clone()
    step(static_q, k, v, w)  # warm-up outside capture: compilation
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(static_q, k, v, w)
    static_q.normal_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, step(static_q, k, v, w))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_FUSED)
def test_gpu_float64(backend):
    """float64 on CUDA: auto takes the CUDA kernel; Triton, forced, says it has no float64 kernels."""
    require_backend("cuda", backend, "query_fusion_attention")
    q, k, v, w, m = _inputs(B=2, H=2, Hkv=1, Q=3, L=2, N=19, d=32, dtype=torch.float64, device="cuda", mask="bq")
    if backend == "triton":
        with use_backend("triton"), pytest.raises(TypeError, match="float64"):
            query_fusion_attention(q, k, v, w, m)
        return
    with use_backend("auto"):
        out = query_fusion_attention(q, k, v, w, m)
    torch.testing.assert_close(out, query_fusion_attention_reference(q, k, v, w, m))
    from amfor.nn import QueryFusion

    module = QueryFusion(32, 4, 5, 2).to("cuda", torch.float64)
    x = torch.randn(2, 2, 19, 32, device="cuda", dtype=torch.float64)
    with use_backend("torch"):
        want = module(x)
    torch.testing.assert_close(module(x), want)
