"""The C++ CPU kernels run on torch's intra-op threads, and their results do not depend on how many.

amfor._C must be compiled with OpenMP (setup.py), or ATen's inlined at::parallel_for is a serial loop; every
kernel promises results that are bitwise the same for any thread count (fixed summation orders, no atomics).
"""

import sys
from collections.abc import Callable

import pytest
import torch

import amfor.ops as ops
from amfor.ops import distill_kl_loss, masked_gather, masked_scatter, query_fusion_attention, rank_metrics, use_backend

pytestmark = pytest.mark.skipif("cpp" not in ops.available_backends("cpu"), reason="amfor._C is not built")
THREADS = (1, 2, 3)


def with_threads(n: int, fn: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with use_backend("cpp"):
            return fn()
    finally:
        torch.set_num_threads(before)


def assert_same_for_every_thread_count(fn: Callable[[], tuple[torch.Tensor, ...]]) -> None:
    want = with_threads(THREADS[0], fn)
    for n in THREADS[1:]:
        got = with_threads(n, fn)
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert torch.equal(a, b), f"output {i} differs between 1 and {n} threads"


@pytest.mark.skipif(not (sys.platform.startswith("linux") and torch.backends.openmp.is_available()),
                    reason="the extension is built with OpenMP only on Linux with an OpenMP build of torch")
def test_kernels_run_on_as_many_threads_as_torch_uses():
    for n in THREADS:
        assert with_threads(n, lambda: torch.ops.amfor.parallel_threads()) == n


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    return (out.detach(), *torch.autograd.grad(out, inputs, g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 24])  # float32 backward: per-layer work units below 4 x threads, else per (b, h')
@pytest.mark.parametrize("masked", [False, True])
def test_query_fusion_attention(dtype, batch, masked):
    gen = torch.Generator().manual_seed(0)
    B, H, Hkv, Q, L, N, d = batch, 4, 2, 5, 3, 37, 48
    q = torch.randn(B, H, Q, d, generator=gen).to(dtype)
    k = [torch.randn(B, Hkv, N, d, generator=gen).to(dtype) for _ in range(L)]
    v = [torch.randn(B, Hkv, N, d, generator=gen).to(dtype) for _ in range(L)]
    w = torch.randn(B, Q, L, generator=gen).softmax(-1)
    mask = torch.rand(B, Q, L, N, generator=gen) > 0.4 if masked else None

    def run():
        inputs = [t.clone().requires_grad_() for t in (q, *k, *v, w)]
        qq, kk, vv, ww = inputs[0], inputs[1:1 + L], inputs[1 + L:1 + 2 * L], inputs[-1]
        return _grads(query_fusion_attention(qq, kk, vv, ww, attn_mask=mask), inputs)

    assert_same_for_every_thread_count(run)


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_distill_kl_loss(reduction):
    gen = torch.Generator().manual_seed(0)
    s, t = (torch.randn(6, 300, 170, generator=gen) * 3 for _ in range(2))
    w = torch.rand(6, generator=gen)

    def run():
        inputs = [s.clone().requires_grad_(), t.clone().requires_grad_(), w.clone().requires_grad_()]
        out = distill_kl_loss(*inputs[:2], temperature=2.0, weights=inputs[2], reduction=reduction)
        return _grads(out, inputs)

    assert_same_for_every_thread_count(run)


def test_masked_gather_and_scatter():
    gen = torch.Generator().manual_seed(0)
    B, N, K, D = 40, 50, 20, 64
    x = torch.randn(B, N, D, generator=gen)
    y = torch.randn(B, K, D, generator=gen)
    index = torch.rand(B, N, generator=gen).argsort(1)[:, :K]
    pos, token = torch.randn(N, D, generator=gen), torch.randn(D, generator=gen)

    def run():
        inputs = [x.clone().requires_grad_(), y.clone().requires_grad_(), pos.clone().requires_grad_(),
                  token.clone().requires_grad_()]
        gathered = masked_gather(inputs[0], index, inputs[2])
        scattered = masked_scatter(inputs[1], index, N, inputs[3], inputs[2])
        return _grads(torch.cat([gathered.flatten(), scattered.flatten()]), inputs)

    assert_same_for_every_thread_count(run)


def test_rank_metrics():
    gen = torch.Generator().manual_seed(0)
    C, G = 300, 900
    dist = torch.rand(C, G, generator=gen).round(decimals=2)  # ties on purpose
    q_pids, g_pids = torch.randint(0, 60, (C,), generator=gen), torch.randint(0, 60, (G,), generator=gen)
    q_cams, g_cams = torch.randint(0, 4, (C,), generator=gen), torch.randint(0, 4, (G,), generator=gen)
    assert_same_for_every_thread_count(lambda: rank_metrics(dist, q_pids, g_pids, q_cams, g_cams))
