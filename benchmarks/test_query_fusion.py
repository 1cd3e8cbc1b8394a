"""query_fusion benchmarks (pytest-benchmark; `python -m benchmarks.gpu_report` reads extra_info).

Two levels, forward pass, ViT-B sizes (D = 768, H = 12, head dim 64):
- `test_query_fusion_op`: q [B, H, Q, 64] over k, v [B, H, L, N, 64]. Providers: the eager loop of SDPA
  calls plus the weighted sum (`sdpa_loop`, the peer), its torch.compile (`sdpa_loop_compiled`), xformers
  memory_efficient_attention per layer (`xformers`), our `reference` and its torch.compile
  (`reference_compiled`), our `triton` / `cuda` (GPU) and `cpp` (CPU). Records GB/s over the bytes the op must
  move (q, k, v, weights, mask read, out written), copy_fraction (against a same-run device copy) and
  speedup_vs_sdpa_loop. Each provider's output is checked against sdpa_loop's before it is timed.
- `test_query_fusion_module`: raw tokens x [B, L, N, D] to fused [B, Q, D], projections included.
  Providers: `reference` (eager MHA: Linear K/V projections of every token + SDPA per layer + weighted sum +
  output projection), `reference_compiled` (its torch.compile), and amfor.nn.QueryFusion on the device's auto
  backend (`auto`), on the projected and on the absorbed path (parameter `path`).
  Records speedup_vs_eager_mha; each output is checked against eager_mha's first.
GPU: B = 64, Q in {7, 10, 16}, L in {1, 4, 6}, N in {129, 211, 242}, bfloat16. CPU: B = 2, Q = 10,
L in {1, 4}, N = 129, float32, 3 rounds (the Triton interpreter is not benchmarked).
"""

from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch
import torch.nn.functional as F

from amfor.nn import QueryFusion
from amfor.ops import use_backend
from amfor.ops.query_fusion import query_fusion_attention, query_fusion_attention_reference
from benchmarks.common import (
    QUICK,
    REFERENCE,
    REFERENCE_COMPILED,
    check_close,
    copy_bandwidth_gbps,
    measure,
    skip_unless,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
D, H = 768, 12
if DEVICE == "cuda":
    B, ROUNDS = 64, 20
    SIZES = [(10, 4, 242)] if QUICK else list(itertools.product((7, 10, 16), (1, 4, 6), (129, 211, 242)))
else:
    B, ROUNDS = 2, 3
    SIZES = [(10, 1, 129), (10, 4, 129)]
HAS_XFORMERS = importlib.util.find_spec("xformers") is not None
_BASELINES: dict[tuple, float] = {}


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _op_inputs(Q: int, L: int, N: int):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(B, H, Q, D // H, device=DEVICE, generator=g).to(DTYPE)
    k = torch.randn(B, H, L, N, D // H, device=DEVICE, generator=g).to(DTYPE)
    v = torch.randn(B, H, L, N, D // H, device=DEVICE, generator=g).to(DTYPE)
    w = torch.softmax(torch.randn(B, Q, L, device=DEVICE, generator=g), -1)
    return q, k, v, w


def sdpa_loop(q, k, v, w):
    """The eager baseline: one SDPA call per layer, then the weighted sum.  -> [B, H, Q, d]"""
    out = 0
    for layer in range(k.shape[2]):
        o = F.scaled_dot_product_attention(q, k[:, :, layer], v[:, :, layer])
        out = out + w[:, None, :, layer, None].to(o.dtype) * o
    return out


def xformers_loop(q, k, v, w):
    """memory_efficient_attention per layer ([B, N, H, d] layout), then the weighted sum.  -> [B, Q, H, d]"""
    import xformers.ops as xops

    qx = q.transpose(1, 2)
    out = 0
    for layer in range(k.shape[2]):
        o = xops.memory_efficient_attention(qx, k[:, :, layer].transpose(1, 2), v[:, :, layer].transpose(1, 2))
        out = out + w[:, :, layer, None, None].to(o.dtype) * o
    return out


def _op_provider(name: str):
    """(callable, skip reason or None) of an op-level provider."""
    if name == "sdpa_loop":
        return sdpa_loop, None
    if name == "sdpa_loop_compiled":
        return torch.compile(sdpa_loop), None
    if name == "xformers":
        return xformers_loop, (None if HAS_XFORMERS and DEVICE == "cuda" else "xformers is not installed / no GPU")
    if name == REFERENCE:
        return (lambda q, k, v, w: query_fusion_attention_reference(q, k, v, w)), None
    if name == REFERENCE_COMPILED:
        return torch.compile(query_fusion_attention_reference), None

    def ours(q, k, v, w):
        with use_backend(name):
            return query_fusion_attention(q, k, v, w)

    return ours, None


def _timed(benchmark, fn, nbytes=None, **info) -> float:
    def run():
        fn()
        _sync()

    return measure(benchmark, run, DEVICE, bytes_moved=nbytes, rounds=ROUNDS, **info)


OP_PROVIDERS = ["sdpa_loop", "sdpa_loop_compiled", "xformers", REFERENCE, REFERENCE_COMPILED, "triton", "cuda", "cpp"]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "Q{}-L{}-N{}".format(*s))
@pytest.mark.parametrize("provider", OP_PROVIDERS)
def test_query_fusion_op(benchmark, provider, size):
    if provider in ("triton", "cuda", "cpp"):
        skip_unless(DEVICE, provider, "query_fusion_attention")
        if provider == "triton" and DEVICE == "cpu":
            pytest.skip("triton on cpu runs in the interpreter: not benchmarked")
    if provider in ("sdpa_loop_compiled", REFERENCE_COMPILED) and DEVICE == "cpu":
        pytest.skip("torch.compile on cpu: left out to keep the cpu run short")
    fn, why = _op_provider(provider)
    if why:
        pytest.skip(why)
    Q, L, N = size
    q, k, v, w = _op_inputs(Q, L, N)
    nbytes = (q.numel() * 2 + k.numel() + v.numel()) * q.element_size() + w.numel() * 4  # q, k, v, w read; out
    got = fn(q, k, v, w)
    check_close(got.transpose(1, 2) if provider == "xformers" else got, sdpa_loop(q, k, v, w), f"{provider} {size}")
    key = ("op", size)
    if key not in _BASELINES:
        _BASELINES[key] = _timed_plain(lambda: sdpa_loop(q, k, v, w))
    median = _timed(benchmark, lambda: fn(q, k, v, w), nbytes, provider=provider, mode="forward", B=B, Q=Q, L=L, N=N,
                    D=D, H=H, dtype=str(DTYPE))
    copy = copy_bandwidth_gbps(nbytes, DEVICE)
    benchmark.extra_info["copy_GB/s"] = copy
    benchmark.extra_info["copy_fraction"] = benchmark.extra_info["GB/s"] / copy
    benchmark.extra_info["speedup_vs_sdpa_loop"] = _BASELINES[key] / median


# ---------------------------------------------------------------------------------------------------------
# Module level: raw tokens in, projections included
# ---------------------------------------------------------------------------------------------------------
def eager_mha(module: QueryFusion, x: torch.Tensor) -> torch.Tensor:
    """The textbook computation with the module's weights: K/V of every token, SDPA per layer, mix, project."""
    Bx, L, N, _ = x.shape
    Q, dh = module.query.shape[0], D // H
    q = module.q_proj(module.query).view(1, Q, H, dh).transpose(1, 2).expand(Bx, H, Q, dh)
    k = module.k_proj(x).view(Bx, L, N, H, dh).permute(0, 3, 1, 2, 4)
    v = module.v_proj(x).view(Bx, L, N, H, dh).permute(0, 3, 1, 2, 4)
    w = torch.softmax(module.layer_logits.float(), 0)
    out = 0
    for layer in range(L):
        out = out + w[layer].to(x.dtype) * F.scaled_dot_product_attention(q, k[:, :, layer], v[:, :, layer])
    return module.proj(out.transpose(1, 2).reshape(Bx, Q, D))


MODULE_CASES = [(REFERENCE, None), (REFERENCE_COMPILED, None), ("auto", "projected"), ("auto", "absorbed")]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "Q{}-L{}-N{}".format(*s))
@pytest.mark.parametrize("provider,path", MODULE_CASES, ids=lambda p: p or "")
def test_query_fusion_module(benchmark, provider, path, size):
    if provider == REFERENCE_COMPILED and DEVICE == "cpu":
        pytest.skip("torch.compile on cpu: left out to keep the cpu run short")
    Q, L, N = size
    module = QueryFusion(D, H, Q, L).to(DEVICE, DTYPE).eval()
    x = torch.randn(B, L, N, D, device=DEVICE, dtype=DTYPE)
    if path is None:
        step = eager_mha if provider == REFERENCE else torch.compile(eager_mha)
        fn = lambda: step(module, x)  # noqa: E731
    else:
        fn = lambda: module(x, path=path)  # noqa: E731 - the backend is the device's auto choice
    key = ("module", size)
    with torch.inference_mode():
        check_close(fn(), eager_mha(module, x), f"{provider} {path} {size}")
        if key not in _BASELINES:
            _BASELINES[key] = _timed_plain(lambda: eager_mha(module, x))
        median = _timed(benchmark, fn, None, provider=provider, path=path or "", mode="forward", B=B, Q=Q, L=L, N=N,
                        D=D, H=H, dtype=str(DTYPE))
    benchmark.extra_info["speedup_vs_eager_mha"] = _BASELINES[key] / median


def _timed_plain(fn) -> float:
    """Median ms of fn outside pytest-benchmark (the same-run baseline of the speedups)."""
    fn()
    _sync()
    if DEVICE == "cuda":
        from benchmarks.common import gpu_median_ms

        return gpu_median_ms(fn)
    import timeit

    return min(timeit.repeat(lambda: (fn(), _sync()), number=3, repeat=3)) / 3 * 1e3
