"""masked_gather / masked_scatter against the MAE-style eager sequence and torch.compile.

Two phases of masked image modelling, each given the kept-token index:
- encoder input: MAE adds the position embedding to all N tokens, then gathers the K kept ones;
  `masked_gather` reads only the kept rows and adds their position rows on the way.
- decoder input: MAE argsorts the shuffle to get the restore order, concatenates mask tokens, gathers back
  into place and adds the decoder position embedding; `masked_scatter` does it in one pass.
Figures: median ms, GB/s over the bytes the fused op must move, and the fraction of a same-run
device-to-device copy of those bytes.
"""

import pytest
import torch

from amfor.ops import masked_patches as mp
from amfor.ops import random_masking, use_backend
from benchmarks.common import QUICK, REFERENCE, REFERENCE_COMPILED, copy_bandwidth_gbps, measure, skip_unless

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
B, N, D = (64, 242, 768) if DEVICE == "cuda" else (32, 242, 768)
KEEP = [0.5] if QUICK else [0.5, 0.75]
PROVIDERS = ["mae", REFERENCE, REFERENCE_COMPILED, "triton", "cuda", "cpp"]  # mae: MAE's eager sequence (the peer)


def _problem(keep: float):
    g = torch.Generator().manual_seed(0)
    K = int(N * keep)
    x = torch.randn(B, N, D, generator=g).to(DEVICE, DTYPE)
    pos = torch.randn(N, D, generator=g).to(DEVICE, DTYPE)
    noise = torch.rand(B, N, generator=g).to(DEVICE)
    index, mask = random_masking(B, N, K, scores=noise)
    ids_shuffle = torch.sort(mask.to(torch.int8), dim=1, stable=True).indices  # MAE's order: kept tokens first
    y = torch.randn(B, K, D, generator=g).to(DEVICE, DTYPE)
    token = torch.randn(D, generator=g).to(DEVICE, DTYPE)
    return x, pos, index, ids_shuffle, y, token, K


def mae_encoder_input(x, pos, ids_shuffle, K):
    """MAE: x + pos over all tokens, then gather the kept ones."""
    x = x + pos
    ids_keep = ids_shuffle[:, :K]
    return torch.gather(x, 1, ids_keep[:, :, None].expand(-1, -1, x.shape[2]))


def mae_decoder_input(y, token, pos, ids_shuffle):
    """MAE: restore order by argsort, cat mask tokens, unshuffle by gather, add the position embedding."""
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    Bn, K, Dn = y.shape
    tokens = token.reshape(1, 1, Dn).expand(Bn, ids_restore.shape[1] - K, Dn)
    full = torch.cat([y, tokens], dim=1)
    full = torch.gather(full, 1, ids_restore[:, :, None].expand(-1, -1, Dn))
    return full + pos


def _encoder_fn(provider, x, pos, index, ids_shuffle, K):
    if provider == "mae":
        return lambda: mae_encoder_input(x, pos, ids_shuffle, K)
    if provider in (REFERENCE, REFERENCE_COMPILED):
        ref = mp.masked_gather_reference if provider == REFERENCE else torch.compile(mp.masked_gather_reference)
        return lambda: ref(x, index, pos)
    skip_unless(DEVICE, provider, "masked_gather")
    if DEVICE == "cpu" and provider == "triton":
        pytest.skip("the Triton interpreter is not a benchmark")

    def fused():
        with use_backend(provider):
            return mp.masked_gather(x, index, pos, check_index=False)

    return fused


def _decoder_fn(provider, y, token, pos, index, ids_shuffle):
    if provider == "mae":
        return lambda: mae_decoder_input(y, token, pos, ids_shuffle)
    if provider in (REFERENCE, REFERENCE_COMPILED):
        ref = mp.masked_scatter_reference if provider == REFERENCE else torch.compile(mp.masked_scatter_reference)
        return lambda: ref(y, index, N, token, pos)
    skip_unless(DEVICE, provider, "masked_scatter")
    if DEVICE == "cpu" and provider == "triton":
        pytest.skip("the Triton interpreter is not a benchmark")

    def fused():
        with use_backend(provider):
            return mp.masked_scatter(y, index, N, token, pos, check_index=False)

    return fused


def _check_and_measure(benchmark, fn, expected, moved: int, op: str, provider: str, K: int) -> None:
    """Check fn() against the MAE sequence's result, then time it with GB/s and the same-run copy fraction."""
    torch.testing.assert_close(fn(), expected)
    measure(benchmark, fn, DEVICE, bytes_moved=moved, op=op, provider=provider, mode="forward", B=B, N=N, D=D, K=K,
            dtype=str(DTYPE))
    benchmark.extra_info["copy_fraction"] = benchmark.extra_info["GB/s"] / copy_bandwidth_gbps(moved // 2, DEVICE)


@pytest.mark.parametrize("keep", KEEP)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_masked_gather(benchmark, provider, keep):
    x, pos, index, ids_shuffle, _, _, K = _problem(keep)
    fn = _encoder_fn(provider, x, pos, index, ids_shuffle, K)
    moved = 2 * B * K * D * x.element_size()  # kept rows read + output written
    _check_and_measure(benchmark, fn, mae_encoder_input(x, pos, ids_shuffle, K), moved, "masked_gather", provider, K)


@pytest.mark.parametrize("keep", KEEP)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_masked_scatter(benchmark, provider, keep):
    _, pos, index, ids_shuffle, y, token, K = _problem(keep)
    fn = _decoder_fn(provider, y, token, pos, index, ids_shuffle)
    moved = (B * K * D + B * N * D) * y.element_size()  # kept rows read + full grid written
    _check_and_measure(benchmark, fn, mae_decoder_input(y, token, pos, ids_shuffle), moved, "masked_scatter",
                       provider, K)
