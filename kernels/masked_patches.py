"""Triton kernels of the masked_patches ops (see amfor/ops/masked_patches.py for the semantics).

Two row kernels serve all three ops:
- `gather_rows`: output row (b, r) = source row rows[b, r] of batch b (a fill row where it is -1) plus an
  optional pos_embed row; masked_gather, masked_scatter (with the inverse index) and the y-gradient of
  masked_scatter are all this kernel.
- `segment_sum_rows`: output row (b, n) = sum of the source rows whose index is n, in increasing k order;
  the x-gradient of masked_gather, deterministic and free of atomics even with repeated indices.
"""

import torch
import triton
import triton.language as tl
from amfor.kernels._launch import on_device


@triton.jit
def _gather_rows_kernel(
    out_ptr,  # [B, R, D] output, contiguous
    src_ptr,  # [B, S, D] source rows, contiguous
    rows_ptr,  # [B, R] int32/int64: source row of each output row, -1 = take the fill row
    fill_ptr,  # [D] fill row (read only when HAS_FILL)
    pos_ptr,  # [P, D] position rows (read only when HAS_POS)
    total_rows,  # B * R
    R,  # output rows per batch element
    S,  # source rows per batch element
    D,  # row length
    ACC: tl.constexpr,  # accumulation dtype: float32, or float64 for float64 data
    HAS_FILL: tl.constexpr,
    HAS_POS: tl.constexpr,
    POS_BY_OUTPUT: tl.constexpr,  # pos row = r (scatter) instead of rows[b, r] (gather)
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    out_rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = out_rows < total_rows
    col_ok = cols < D
    src_row = tl.load(rows_ptr + out_rows, mask=row_ok, other=-1).to(tl.int64)
    batch = (out_rows // R).to(tl.int64)
    has_src = row_ok & (src_row >= 0) & (src_row < S)
    src_off = (batch * S + src_row)[:, None] * D + cols[None, :]
    val = tl.load(src_ptr + src_off, mask=has_src[:, None] & col_ok[None, :], other=0.0).to(ACC)
    if HAS_FILL:
        fill = tl.load(fill_ptr + cols, mask=col_ok, other=0.0).to(ACC)
        val = tl.where(has_src[:, None], val, fill[None, :])
    if HAS_POS:
        if POS_BY_OUTPUT:
            pos_row = (out_rows % R).to(tl.int64)
            pos_ok = row_ok
        else:
            pos_row = src_row
            pos_ok = has_src
        pos = tl.load(pos_ptr + pos_row[:, None] * D + cols[None, :], mask=pos_ok[:, None] & col_ok[None, :], other=0.0)
        val += pos.to(ACC)
    out_off = out_rows.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(out_ptr + out_off, val.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _segment_sum_rows_kernel(
    out_ptr,  # [B, N, D] output, contiguous
    src_ptr,  # [B, K, D] rows to sum, contiguous
    perm_ptr,  # [B, K] int64: k sorted by (index[b, k], k)
    starts_ptr,  # [B, N + 1] int64: segment n of row b is perm[b, starts[b, n]:starts[b, n + 1]]
    N,  # output rows per batch element
    K,  # source rows per batch element
    D,  # row length
    ACC: tl.constexpr,  # accumulation dtype: float32, or float64 for float64 data
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = (pid // N).to(tl.int64)
    n = pid % N
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    begin = tl.load(starts_ptr + batch * (N + 1) + n)
    end = tl.load(starts_ptr + batch * (N + 1) + n + 1)
    acc = tl.zeros((BLOCK_D,), dtype=ACC)
    for j in range(begin, end):
        k = tl.load(perm_ptr + batch * K + j)
        acc += tl.load(src_ptr + (batch * K + k) * D + cols, mask=col_ok, other=0.0).to(ACC)
    tl.store(out_ptr + pid.to(tl.int64) * D + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def _block_d(D: int) -> int:
    return min(triton.next_power_of_2(max(D, 1)), 1024)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def gather_rows(src: torch.Tensor, rows: torch.Tensor, fill: torch.Tensor | None, pos: torch.Tensor | None,
                pos_by_output: bool) -> torch.Tensor:
    """out[b, r] = (src[b, rows[b, r]] or fill where rows is -1) + pos[r or rows[b, r]].

    src: [B, S, D]; rows: [B, R] int; fill: [D] or None; pos: [P, D] or None  ->  [B, R, D] of src.dtype.
    """
    B, S, D = src.shape
    R = rows.shape[1]
    src, rows = src.contiguous(), rows.contiguous()
    fill = fill.contiguous() if fill is not None else None
    pos = pos.contiguous() if pos is not None else None
    out = torch.empty((B, R, D), dtype=src.dtype, device=src.device)
    if out.numel() == 0:
        return out
    block_d = _block_d(D)
    block_r = max(1, min(16, 4096 // block_d))
    grid = (triton.cdiv(B * R, block_r), triton.cdiv(D, block_d))
    with on_device(src):
        _gather_rows_kernel[grid](
            out, src, rows, fill if fill is not None else src, pos if pos is not None else src,
            B * R, R, S, D, ACC=_acc(src.dtype), HAS_FILL=fill is not None, HAS_POS=pos is not None,
            POS_BY_OUTPUT=pos_by_output, BLOCK_R=block_r, BLOCK_D=block_d,
        )
    return out


def segment_sum_rows(src: torch.Tensor, perm: torch.Tensor, starts: torch.Tensor, num_rows: int) -> torch.Tensor:
    """out[b, n] = sum_{j in [starts[b, n], starts[b, n + 1])} src[b, perm[b, j]], zero for empty segments.

    src: [B, K, D]; perm: [B, K] int64; starts: [B, N + 1] int64  ->  [B, N, D] of src.dtype.
    """
    B, K, D = src.shape
    out = torch.empty((B, num_rows, D), dtype=src.dtype, device=src.device)
    if out.numel() == 0:
        return out
    block_d = _block_d(D)
    grid = (B * num_rows, triton.cdiv(D, block_d))
    with on_device(src):
        _segment_sum_rows_kernel[grid](out, src.contiguous(), perm.contiguous(), starts.contiguous(), num_rows, K, D,
                                       ACC=_acc(src.dtype), BLOCK_D=block_d)
    return out
