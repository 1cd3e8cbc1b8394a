"""Triton kernels of query_fusion_attention (see amfor/ops/query_fusion.py for the semantics).

Few queries over many keys is memory-bound, so every kernel is built to read each key/value token once:
a program owns a block of "rows" (the (head, query) pairs of one key/value head group of one image), keeps
them on chip and streams the tokens of all L layers past them, flash-attention style (online softmax per
layer, the layer-weighted sum kept in registers, no per-layer output written).

- `_fwd_kernel`:  out = sum_l w_l softmax(q k_l^T) v_l and the per-(row, layer) log-sum-exp.
- `_dq_kernel`:   dq, and t[row, l] = dout . o_l (the layer-weight gradient, and the softmax "delta"),
                  in one pass over the tokens: dq_l = w_l (sum_n p_n dp_n k_n - t_l sum_n p_n k_n).
- `_dkdv_kernel`: dk, dv; a program owns a block of tokens of one layer and loops over all rows of its group,
                  so each dk/dv element is written by one program in a fixed order: deterministic, no atomics.

Keys/values arrive as L separate layer tensors (nothing is stacked): `k_ptr` is layer 0 and `k_off[l]` the
element offset of layer l from it; all layers share the strides (b, head, token) and have unit stride in d.
Head dims above 128 (up to 1024, the projection-absorbed path of amfor.nn.QueryFusion) are tiled: the
score dot products loop over d in BLOCK_D chunks and the output is split in d chunks over grid axis 1.
"""

from collections import OrderedDict

import torch
import triton
import triton.language as tl
from amfor.kernels._launch import INTERPRETED, on_device, shared_memory_limit

# log2(e) and ln(2): the kernels work in base 2 (exp2, log2). constexpr, so the jitted kernels can read them; the
# launchers use `.value`. (The head-dim limit is amfor.ops.query_fusion.MAX_HEAD_DIM.)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _pair_dots(a_ptr, a_rows, a_ok, b_ptr, b_rows, b_ok, D,
               RA: tl.constexpr, RB: tl.constexpr, BLOCK_D: tl.constexpr, CAST_F32: tl.constexpr,
               PRECISION: tl.constexpr):
    """[RA, RB] float32: dot products over d of rows a_ptr + a_rows[i] with rows b_ptr + b_rows[j]."""
    acc = tl.zeros((RA, RB), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        c_ok = cols < D
        a = tl.load(a_ptr + a_rows[:, None] + cols[None, :], mask=a_ok[:, None] & c_ok[None, :], other=0.0)
        b = tl.load(b_ptr + b_rows[:, None] + cols[None, :], mask=b_ok[:, None] & c_ok[None, :], other=0.0)
        if CAST_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, tl.trans(b), input_precision=PRECISION)
    return acc


@triton.jit
def _mm(p, x, CAST_F32: tl.constexpr, PRECISION: tl.constexpr):
    """p [R, T] float32 @ x [T, C] -> [R, C] float32; p is rounded to x's dtype first on the GPU (tensor cores)."""
    if CAST_F32:
        return tl.dot(p, x.to(tl.float32), input_precision=PRECISION)
    return tl.dot(p.to(x.dtype), x, input_precision=PRECISION)


@triton.jit
def _group_rows(pid, Hkv, G, Q, H, BLOCK_M: tl.constexpr):
    """Decode a row-block program id: (b, kv head, rows of the group in this block, their ok-mask,
    query index, global row id (b, h, q) flattened as int64)."""
    num_m = tl.cdiv(G * Q, BLOCK_M)
    mb = pid % num_m
    bh = pid // num_m
    hkv = bh % Hkv
    b = bh // Hkv
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < G * Q
    qi = rows % Q
    grow = (b.to(tl.int64) * H + hkv * G) * Q + rows
    return b, hkv, row_ok, qi, grow


@triton.jit
def _layer_base(ptr, off_ptr, layer, b, hkv, s_b, s_h):
    """Start of image b, kv head hkv in layer `layer` of a keys/values argument (per-layer element offsets)."""
    return ptr + tl.load(off_ptr + layer) + b.to(tl.int64) * s_b + hkv.to(tl.int64) * s_h


@triton.jit
def _valid_keys(mask_ptr, b, qi, row_ok, layer, offs_n, n_ok, Qm, L, N, mask_sq, HAS_MASK: tl.constexpr):
    """[R, BLOCK_N] bool: token n exists and row (query qi) may attend to it in `layer`."""
    valid = row_ok[:, None] & n_ok[None, :]
    if HAS_MASK:
        m_off = (b.to(tl.int64) * Qm * L + layer) * N + qi.to(tl.int64)[:, None] * mask_sq + offs_n[None, :]
        allowed = tl.load(mask_ptr + m_off, mask=valid, other=0)
        valid = valid & (allowed != 0)
    return valid


@triton.jit
def _fwd_kernel(
    out_ptr,  # [B, H, Q, D] output in q's dtype, contiguous
    lse_ptr,  # [B, H, Q, L] float32: log-sum-exp of the scaled scores; -inf where a layer is fully masked
    q_ptr,  # [B, H, Q, D] queries, contiguous
    k_ptr,  # keys of layer 0: [B, Hkv, N, D], strides (sk_b, sk_h, sk_n, 1)
    k_off_ptr,  # [L] int64: element offset of layer l's keys from k_ptr
    v_ptr,  # values of layer 0: [B, Hkv, N, D], strides (sv_b, sv_h, sv_n, 1)
    v_off_ptr,  # [L] int64: element offset of layer l's values from v_ptr
    w_ptr,  # [B, Q, L] float32 layer weights
    mask_ptr,  # [B, Qm, L, N] uint8 attention mask, 1 = may attend (read only when HAS_MASK)
    sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
    H, Hkv, G, Q, L, N, D,  # G = H // Hkv heads share one key/value head
    Qm, mask_sq,  # mask query extent (1 or Q) and its stride over queries (0 when Qm == 1)
    qk_scale,  # scale * log2(e): the scores are kept in base 2
    HAS_MASK: tl.constexpr, CAST_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    b, hkv, row_ok, qi, grow = _group_rows(tl.program_id(0), Hkv, G, Q, H, BLOCK_M)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK_DV + tl.arange(0, BLOCK_DV)
    c_ok = cols < D
    out_acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    for layer in range(L):
        k_base = _layer_base(k_ptr, k_off_ptr, layer, b, hkv, sk_b, sk_h)
        v_base = _layer_base(v_ptr, v_off_ptr, layer, b, hkv, sv_b, sv_h)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < N
            s = _pair_dots(q_ptr, grow * D, row_ok, k_base, offs_n.to(tl.int64) * sk_n, n_ok, D,
                           BLOCK_M, BLOCK_N, BLOCK_DK, CAST_F32, PRECISION) * qk_scale
            valid = _valid_keys(mask_ptr, b, qi, row_ok, layer, offs_n, n_ok, Qm, L, N, mask_sq, HAS_MASK)
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = tl.load(v_base + offs_n.to(tl.int64)[:, None] * sv_n + cols[None, :],
                         mask=n_ok[:, None] & c_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + _mm(p, vt, CAST_F32, PRECISION)
            m_i = m_new
        w = tl.load(w_ptr + (b.to(tl.int64) * Q + qi) * L + layer, mask=row_ok, other=0.0)
        has = l_i > 0
        out_acc += acc * tl.where(has, w / tl.where(has, l_i, 1.0), 0.0)[:, None]
        lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * LN2, float("-inf"))
        tl.store(lse_ptr + grow * L + layer, lse, mask=row_ok & (chunk == 0))
    out_off = grow[:, None] * D + cols[None, :]
    tl.store(out_ptr + out_off, out_acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & c_ok[None, :])


@triton.jit
def _dq_kernel(
    dq_ptr,  # [B, H, Q, D] output: gradient of q, q's dtype, contiguous
    t_ptr,  # [B, H, Q, L] float32 output: t = dout . o_l (unweighted layer output), the layer-weight gradient
    dout_ptr,  # [B, H, Q, D] gradient of out, contiguous
    q_ptr, k_ptr, k_off_ptr, v_ptr, v_off_ptr, w_ptr, mask_ptr,  # as in _fwd_kernel
    lse_ptr,  # [B, H, Q, L] float32 from the forward
    sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
    H, Hkv, G, Q, L, N, D, Qm, mask_sq,
    scale, qk_scale,
    HAS_MASK: tl.constexpr, CAST_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    b, hkv, row_ok, qi, grow = _group_rows(tl.program_id(0), Hkv, G, Q, H, BLOCK_M)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK_DV + tl.arange(0, BLOCK_DV)
    c_ok = cols < D
    dq = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    for layer in range(L):
        k_base = _layer_base(k_ptr, k_off_ptr, layer, b, hkv, sk_b, sk_h)
        v_base = _layer_base(v_ptr, v_off_ptr, layer, b, hkv, sv_b, sv_h)
        lse = tl.load(lse_ptr + grow * L + layer, mask=row_ok, other=float("-inf")) * LOG2E
        lse = tl.where(lse == float("-inf"), 0.0, lse)
        t = tl.zeros((BLOCK_M,), dtype=tl.float32)
        a_acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
        k_mean = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < N
            n_rows_k = offs_n.to(tl.int64) * sk_n
            s = _pair_dots(q_ptr, grow * D, row_ok, k_base, n_rows_k, n_ok, D,
                           BLOCK_M, BLOCK_N, BLOCK_DK, CAST_F32, PRECISION) * qk_scale
            valid = _valid_keys(mask_ptr, b, qi, row_ok, layer, offs_n, n_ok, Qm, L, N, mask_sq, HAS_MASK)
            p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
            dp = _pair_dots(dout_ptr, grow * D, row_ok, v_base, offs_n.to(tl.int64) * sv_n, n_ok, D,
                            BLOCK_M, BLOCK_N, BLOCK_DK, CAST_F32, PRECISION)
            pdp = p * dp
            t += tl.sum(pdp, 1)
            kt = tl.load(k_base + n_rows_k[:, None] + cols[None, :], mask=n_ok[:, None] & c_ok[None, :], other=0.0)
            a_acc += _mm(pdp, kt, CAST_F32, PRECISION)
            k_mean += _mm(p, kt, CAST_F32, PRECISION)
        w = tl.load(w_ptr + (b.to(tl.int64) * Q + qi) * L + layer, mask=row_ok, other=0.0)
        dq += w[:, None] * (a_acc - t[:, None] * k_mean)
        tl.store(t_ptr + grow * L + layer, t, mask=row_ok & (chunk == 0))
    out_off = grow[:, None] * D + cols[None, :]
    tl.store(dq_ptr + out_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None] & c_ok[None, :])


@triton.jit
def _dkdv_kernel(
    dk_ptr,  # [B, Hkv, L, N, D] output: gradient of the keys, contiguous
    dv_ptr,  # [B, Hkv, L, N, D] output: gradient of the values, contiguous
    dout_ptr, q_ptr, k_ptr, k_off_ptr, v_ptr, v_off_ptr, w_ptr, mask_ptr, lse_ptr,  # as in _dq_kernel
    t_ptr,  # [B, H, Q, L] float32 from _dq_kernel
    sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
    H, Hkv, G, Q, L, N, D, Qm, mask_sq,
    scale, qk_scale,
    HAS_MASK: tl.constexpr, CAST_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0)  # over B * Hkv * L * cdiv(N, BLOCK_N)
    num_nb = tl.cdiv(N, BLOCK_N)
    nb = pid % num_nb
    layer = (pid // num_nb) % L
    bh = pid // (num_nb * L)
    hkv = bh % Hkv
    b = bh // Hkv
    cols = tl.program_id(1) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    c_ok = cols < D
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    k_base = _layer_base(k_ptr, k_off_ptr, layer, b, hkv, sk_b, sk_h)
    v_base = _layer_base(v_ptr, v_off_ptr, layer, b, hkv, sv_b, sv_h)
    dk = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    for m0 in range(0, G * Q, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < G * Q
        qi = rows % Q
        grow = (b.to(tl.int64) * H + hkv * G) * Q + rows
        lse = tl.load(lse_ptr + grow * L + layer, mask=row_ok, other=float("-inf")) * LOG2E
        lse = tl.where(lse == float("-inf"), 0.0, lse)
        w = tl.load(w_ptr + (b.to(tl.int64) * Q + qi) * L + layer, mask=row_ok, other=0.0)
        t = tl.load(t_ptr + grow * L + layer, mask=row_ok, other=0.0)
        s_t = _pair_dots(k_base, offs_n.to(tl.int64) * sk_n, n_ok, q_ptr, grow * D, row_ok, D,
                         BLOCK_N, BLOCK_M, BLOCK_DK, CAST_F32, PRECISION) * qk_scale
        valid = tl.trans(_valid_keys(mask_ptr, b, qi, row_ok, layer, offs_n, n_ok, Qm, L, N, mask_sq, HAS_MASK))
        p_t = tl.where(valid, tl.exp2(s_t - lse[None, :]), 0.0)
        dp_t = _pair_dots(v_base, offs_n.to(tl.int64) * sv_n, n_ok, dout_ptr, grow * D, row_ok, D,
                          BLOCK_N, BLOCK_M, BLOCK_DK, CAST_F32, PRECISION)
        ds_t = p_t * (dp_t - t[None, :]) * w[None, :]
        row_cols = grow[:, None] * D + cols[None, :]
        rc_ok = row_ok[:, None] & c_ok[None, :]
        q_c = tl.load(q_ptr + row_cols, mask=rc_ok, other=0.0)
        do_c = tl.load(dout_ptr + row_cols, mask=rc_ok, other=0.0)
        dv += _mm(p_t * w[None, :], do_c, CAST_F32, PRECISION)
        dk += _mm(ds_t, q_c, CAST_F32, PRECISION)
    out_off = (((b.to(tl.int64) * Hkv + hkv) * L + layer) * N + offs_n)[:, None] * D + cols[None, :]
    o_ok = n_ok[:, None] & c_ok[None, :]
    tl.store(dk_ptr + out_off, (dk * scale).to(dk_ptr.dtype.element_ty), mask=o_ok)
    tl.store(dv_ptr + out_off, dv.to(dv_ptr.dtype.element_ty), mask=o_ok)


# ---------------------------------------------------------------------------------------------------------
# Launch helpers
# ---------------------------------------------------------------------------------------------------------
def _layout(layers: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
    """(layer 0, [L] int64 element offsets of each layer from layer 0, strides (b, head, token)).

    layers: L tensors [B, Hkv, N, D] of one dtype with identical strides and unit stride in D.
    """
    base = layers[0]
    size = base.element_size()
    offsets = tuple((t.data_ptr() - base.data_ptr()) // size for t in layers)
    step = offsets[1] if len(offsets) > 1 else 0
    if all(off == i * step for i, off in enumerate(offsets)):
        # evenly spaced layers (views of one stacked tensor): built on the device, no host-to-device copy
        table = torch.arange(len(layers), device=base.device, dtype=torch.int64) * step
    else:
        table = offset_table(offsets, base.device)
    s = base.stride()
    return base, table, (s[0], s[1], s[2])


_TABLES: OrderedDict = OrderedDict()  # (device, offsets) -> (host copy, device table), least recently used first
_CAPTURED: dict = {}  # tables a CUDA graph may read at replay: kept for the life of the process
_MAX_TABLES = 64


def offset_table(offsets: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """[L] int64 table of `offsets` on `device` without a blocking copy, usable inside CUDA-graph capture.

    Separately allocated layers need their offsets on the device. A table is cached per (device, offsets), so
    a training loop that reuses its buffers, and every replay of a captured graph, copies nothing; a new set is
    copied from pinned host memory with non_blocking=True (no host sync; captured as a graph memcpy node).
    Tables used during a capture are never evicted (the graph reads them at every replay).
    """
    key = (device, offsets)
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    entry = _CAPTURED.get(key) or _TABLES.get(key)
    if entry is None:
        host = torch.tensor(offsets, dtype=torch.int64, pin_memory=device.type == "cuda")
        entry = (host, host.to(device, non_blocking=True) if device.type != "cpu" else host)
        _TABLES[key] = entry
    if capturing:
        _CAPTURED[key] = entry
    if key in _TABLES:
        _TABLES.move_to_end(key)
        while len(_TABLES) > _MAX_TABLES:
            _TABLES.popitem(last=False)
    return entry[1]


def _blocks(rows: int, D: int, q: torch.Tensor) -> dict:
    """Tile sizes and warps for `rows` query rows per group and head dim D on q's device.

    Up to 64 rows, the whole head dim in one tile up to 128, else d chunks of 64 (scores) / 128 (output); then
    rows and tokens per tile are halved until the estimated shared memory fits the device's opt-in limit
    (float32 at d = 128 needs ~104 KiB with 64 rows: more than sm_86/sm_89 have; 32 rows take ~68 KiB).
    scripts/gpu_compile_check.py compiles every launcher configuration for sm_80/86/90 and checks the real use.
    """
    block_m = max(16, min(64, triton.next_power_of_2(rows)))
    if D <= 128:
        block_dk = block_dv = max(16, triton.next_power_of_2(D))
        block_n = 64 if D <= 64 else 32
    else:
        block_dk, block_dv, block_n = 64, 128, 32
    elem = 4 if _flags(q, None)["CAST_F32"] else q.element_size()
    limit = shared_memory_limit(q.device)
    while _smem_estimate(block_m, block_n, block_dk, elem) > limit and max(block_m, block_n) > 16:
        if block_m >= block_n:
            block_m //= 2
        else:
            block_n //= 2
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_DK=block_dk, BLOCK_DV=block_dv,
                num_warps=4 if D <= 64 else 8)


def _smem_estimate(block_m: int, block_n: int, block_dk: int, elem: int) -> float:
    """Bytes of shared memory of the pipelined q, k and v tiles: measured on sm_80/86 (ptxas), rounded up."""
    return 1.7 * elem * (block_m + 2 * block_n) * block_dk


def _common(q: torch.Tensor, k: list[torch.Tensor], v: list[torch.Tensor], mask: torch.Tensor | None):
    """Shared launch arguments: pointers, strides and sizes."""
    B, H, Q, D = q.shape
    Hkv, N = k[0].shape[1], k[0].shape[2]
    k0, k_off, sk = _layout(k)
    v0, v_off, sv = _layout(v)
    Qm = mask.shape[1] if mask is not None else 1
    mask_arg = mask.view(torch.uint8) if mask is not None else k_off
    sizes = (H, Hkv, H // Hkv, Q, len(k), N, D, Qm, (len(k) * N if Qm > 1 else 0))
    return (k0, k_off, v0, v_off, mask_arg), (*sk, *sv), sizes


def _flags(q: torch.Tensor, mask: torch.Tensor | None) -> dict:
    """float32 math everywhere under the interpreter (its bf16 dot is not faithful) and for float32 inputs."""
    f32 = INTERPRETED or q.dtype == torch.float32
    return dict(HAS_MASK=mask is not None, CAST_F32=f32, PRECISION="ieee" if f32 else "tf32")


def forward(q: torch.Tensor, k: list[torch.Tensor], v: list[torch.Tensor], weights: torch.Tensor,
            mask: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """out [B, H, Q, D] (q.dtype), lse [B, H, Q, L] float32.

    q: [B, H, Q, D] contiguous; k, v: L tensors [B, Hkv, N, D] (shared strides, unit stride in D);
    weights: [B, Q, L] float32 contiguous; mask: [B, 1 or Q, L, N] bool contiguous or None.
    """
    B, H, Q, D = q.shape
    L = len(k)
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out, empty_head_lse(q, L, k[0].shape[2], mask)
    lse = torch.empty((B, H, Q, L), dtype=torch.float32, device=q.device)
    ptrs, strides, sizes = _common(q, k, v, mask)
    blocks = _blocks(sizes[2] * Q, D, q)
    grid = (B * sizes[1] * triton.cdiv(sizes[2] * Q, blocks["BLOCK_M"]), triton.cdiv(D, blocks["BLOCK_DV"]))
    k0, k_off, v0, v_off, mask_arg = ptrs
    with on_device(q):
        _fwd_kernel[grid](out, lse, q, k0, k_off, v0, v_off, weights, mask_arg, *strides, *sizes, scale * LOG2E.value,
                          **_flags(q, mask), **blocks)
    return out, lse


def empty_head_lse(q: torch.Tensor, L: int, N: int, mask: torch.Tensor | None) -> torch.Tensor:
    """lse [B, H, Q, L] float32 when there is nothing to compute (head dim 0 or no rows): every scaled score is 0,
    so lse = log(number of keys the row may attend), -inf where it may attend none."""
    B, H, Q, _ = q.shape
    if mask is None:
        count = torch.full((B, 1, 1, L), float(N), dtype=torch.float32, device=q.device)
    else:
        count = mask.sum(-1, dtype=torch.float32)[:, None]  # [B, 1, Q or 1, L]
    return count.log().expand(B, H, Q, L).contiguous()


def backward(grad: torch.Tensor, q: torch.Tensor, k: list[torch.Tensor], v: list[torch.Tensor],
             weights: torch.Tensor, mask: torch.Tensor | None, scale: float, lse: torch.Tensor):
    """(dq [B, H, Q, D], dk [B, Hkv, L, N, D], dv [B, Hkv, L, N, D], t [B, H, Q, L] float32 = dout . o_l).

    Arguments as in `forward`, grad: [B, H, Q, D] contiguous, lse from `forward`.
    """
    B, H, Q, D = q.shape
    L, Hkv, N = len(k), k[0].shape[1], k[0].shape[2]
    dq = torch.empty_like(q)
    dk = torch.empty((B, Hkv, L, N, D), dtype=k[0].dtype, device=q.device)
    dv = torch.empty((B, Hkv, L, N, D), dtype=v[0].dtype, device=q.device)
    t = torch.zeros((B, H, Q, L), dtype=torch.float32, device=q.device)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), t
    ptrs, strides, sizes = _common(q, k, v, mask)
    k0, k_off, v0, v_off, mask_arg = ptrs
    blocks = _blocks(sizes[2] * Q, D, q)
    flags = _flags(q, mask)
    grid = (B * Hkv * triton.cdiv(sizes[2] * Q, blocks["BLOCK_M"]), triton.cdiv(D, blocks["BLOCK_DV"]))
    with on_device(q):
        _dq_kernel[grid](dq, t, grad, q, k0, k_off, v0, v_off, weights, mask_arg, lse, *strides, *sizes,
                         scale, scale * LOG2E.value, **flags, **blocks)
        grid = (B * Hkv * L * triton.cdiv(N, blocks["BLOCK_N"]), triton.cdiv(D, blocks["BLOCK_DV"]))
        _dkdv_kernel[grid](dk, dv, grad, q, k0, k_off, v0, v_off, weights, mask_arg, lse, t, *strides, *sizes,
                           scale, scale * LOG2E.value, **flags, **blocks)
    return dq, dk, dv, t
