"""Triton kernel of the distill_kl_loss op (see amfor/ops/distill_loss.py for the semantics).

One program per row r of the flattened logits [R, C] (R = G * B) computes, in one launch,
    loss[r]  = T^2 * KL(p_t || p_s),   p = softmax(logits / T) over C,
and, when asked, the gradients of scale[r] * loss[r] with respect to both rows, where scale[r] = w[g] / B
(batchmean) or w[g] (sum, none) is the factor the weights and the reduction give row r = (g, b):
    d loss[r] / d student = T * (p_s - p_t)
    d loss[r] / d teacher = T * p_t * (log p_t - log p_s - KL)
Folding the scale in before the single rounding to the gradients' dtype makes the stored gradient the final one
for grad_output = 1, so the backward only multiplies it by grad_output. The gradients are stored in the logits
dtype, float32 for float16 logits (amfor.ops.distill_loss.grad_dtype: ~T / (B C) per entry is a float16
subnormal before the AMP loss scale).
A row of up to MAX_BLOCK classes is loaded once and kept in registers: row maxima, then the sums of the
shifted exponentials Z_s, Z_t and A = sum exp(dt) * (dt - ds) (ds = s - max s, dt = t - max t), so that
KL = A / Z_t - log Z_t + log Z_s involves only shifted values (no cancellation between large logits), then the
gradients from the same registers. Longer rows take three sweeps over C in MAX_BLOCK chunks (maxima, sums,
gradients); the second and third re-read a row its program has just read, from L2. Accumulation is float32
(float64 for float64 logits). Teacher logits of -inf are classes of probability zero (0 * log 0 = 0); a row
whose teacher logits are all -inf has loss 0 and zero gradients.
"""

import torch
import triton
import triton.language as tl
from amfor.kernels._launch import on_device

MAX_BLOCK = 8192  # widest row held in registers; longer rows are swept in chunks of this width


@triton.jit
def _row_terms(s, t, m_s, m_t):
    """Shifted logits ds = s - m_s, dt = t - m_t and their exps; -inf teacher classes stay -inf with e_t = 0."""
    ds = s - m_s
    dt = t - m_t
    return ds, dt, tl.exp(ds), tl.exp(dt)


@triton.jit
def _store_grads(grad_s_ptr, grad_t_ptr, offs, ok, ds, dt, e_s, e_t, log_zs, log_zt, inv_zs, inv_zt, kl, gscale,
                 STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr):
    """grad_s = gscale * (p_s - p_t); grad_t = gscale * p_t * (log p_t - log p_s - KL), 0 where p_t = 0."""
    p_t = e_t * inv_zt
    if STUDENT_GRAD:
        g_s = gscale * (e_s * inv_zs - p_t)
        tl.store(grad_s_ptr + offs, g_s.to(grad_s_ptr.dtype.element_ty), mask=ok)
    if TEACHER_GRAD:
        ratio = tl.where(p_t > 0, (dt - log_zt) - (ds - log_zs), 0.0)
        g_t = gscale * p_t * tl.where(p_t > 0, ratio - kl, 0.0)
        tl.store(grad_t_ptr + offs, g_t.to(grad_t_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _distill_kl_kernel(
    loss_ptr,  # [R] float32 (float64 for float64 logits): T^2 * KL(p_t || p_s) of each row
    grad_s_ptr,  # [R, C] contiguous, gradients' dtype: scale[r] * d loss[r] / d student[r] (when STUDENT_GRAD)
    grad_t_ptr,  # [R, C] contiguous, gradients' dtype: scale[r] * d loss[r] / d teacher[r] (when TEACHER_GRAD)
    s_ptr,  # [R, C] student logits, row stride s_stride, unit column stride
    t_ptr,  # [R, C] teacher logits, row stride t_stride, unit column stride
    w_ptr,  # [R // B] granularity weights, float32/float64 (read when HAS_WEIGHTS): scale[r] = factor * w[r // B]
    s_stride,  # elements between student rows
    t_stride,  # elements between teacher rows
    C,  # classes per row
    B,  # rows per granularity (the batch)
    inv_temp: tl.float64,  # 1 / T; float64 in the signature (a bare Python float would compile as float32)
    temp: tl.float64,  # T
    factor: tl.float64,  # gradient factor of the reduction: 1 / B for batchmean, 1 otherwise
    STUDENT_GRAD: tl.constexpr,
    TEACHER_GRAD: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    ACC: tl.constexpr,  # accumulation dtype: tl.float32, or tl.float64 for float64 logits
    BLOCK: tl.constexpr,
    SINGLE: tl.constexpr,  # C <= BLOCK: the row is loaded once and stays in registers
):
    inv_temp = tl.cast(inv_temp, ACC)  # rounded once to the accumulation type: exact for float64 logits
    temp = tl.cast(temp, ACC)
    factor = tl.cast(factor, ACC)
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    g_off = row * C
    cols = tl.arange(0, BLOCK)
    neg_inf = float("-inf")
    gscale = temp * factor
    if HAS_WEIGHTS:
        gscale = gscale * tl.load(w_ptr + row // B).to(ACC)

    if SINGLE:
        ok = cols < C
        s = tl.load(s_row + cols, mask=ok, other=neg_inf).to(ACC) * inv_temp
        t = tl.load(t_row + cols, mask=ok, other=neg_inf).to(ACC) * inv_temp
        m_s = tl.max(s, 0)
        m_t = tl.max(t, 0)
    else:  # sweep 1: the row maxima
        vm_s = tl.full((BLOCK,), neg_inf, ACC)
        vm_t = tl.full((BLOCK,), neg_inf, ACC)
        for start in range(0, C, BLOCK):
            ok = start + cols < C
            vm_s = tl.maximum(vm_s, tl.load(s_row + start + cols, mask=ok, other=neg_inf).to(ACC) * inv_temp)
            vm_t = tl.maximum(vm_t, tl.load(t_row + start + cols, mask=ok, other=neg_inf).to(ACC) * inv_temp)
        m_s = tl.max(vm_s, 0)
        m_t = tl.max(vm_t, 0)
    has_teacher = m_t > neg_inf
    m_t = tl.where(has_teacher, m_t, 0.0)  # no teacher class at all: the row adds 0 (and no NaN below)

    # Sums of exp(ds), exp(dt) and exp(dt) * (dt - ds) with the shifted logits: KL = A / Z_t - log Z_t + log Z_s.
    if SINGLE:
        ds, dt, e_s, e_t = _row_terms(s, t, m_s, m_t)
        z_s = tl.sum(e_s, 0)
        z_t = tl.sum(e_t, 0)
        a = tl.sum(e_t * tl.where(e_t > 0, dt - tl.where(ok, ds, 0.0), 0.0), 0)
    else:  # sweep 2
        vz_s = tl.zeros((BLOCK,), ACC)
        vz_t = tl.zeros((BLOCK,), ACC)
        va = tl.zeros((BLOCK,), ACC)
        for start in range(0, C, BLOCK):
            ok = start + cols < C
            s = tl.load(s_row + start + cols, mask=ok, other=neg_inf).to(ACC) * inv_temp
            t = tl.load(t_row + start + cols, mask=ok, other=neg_inf).to(ACC) * inv_temp
            ds, dt, e_s, e_t = _row_terms(s, t, m_s, m_t)
            vz_s += e_s
            vz_t += e_t
            va += e_t * tl.where(e_t > 0, dt - tl.where(ok, ds, 0.0), 0.0)
        z_s = tl.sum(vz_s, 0)
        z_t = tl.sum(vz_t, 0)
        a = tl.sum(va, 0)
    has_teacher = has_teacher & (z_t > 0)
    z_t = tl.where(has_teacher, z_t, 1.0)
    log_zs = tl.log(z_s)
    log_zt = tl.log(z_t)
    kl = tl.where(has_teacher, a / z_t - log_zt + log_zs, 0.0)
    tl.store(loss_ptr + row, (kl * temp * temp).to(loss_ptr.dtype.element_ty))

    # Gradients of scale[r] * loss[r] (zero for a row without teacher classes).
    if STUDENT_GRAD or TEACHER_GRAD:
        gscale = tl.where(has_teacher, gscale, 0.0)
        inv_zs = 1.0 / z_s
        inv_zt = 1.0 / z_t
        if SINGLE:
            _store_grads(grad_s_ptr, grad_t_ptr, g_off + cols, ok, ds, dt, e_s, e_t, log_zs, log_zt, inv_zs, inv_zt,
                         kl, gscale, STUDENT_GRAD, TEACHER_GRAD)
        else:  # sweep 3
            for start in range(0, C, BLOCK):
                ok = start + cols < C
                s = tl.load(s_row + start + cols, mask=ok, other=0.0).to(ACC) * inv_temp
                t = tl.load(t_row + start + cols, mask=ok, other=neg_inf).to(ACC) * inv_temp
                ds, dt, e_s, e_t = _row_terms(s, t, m_s, m_t)
                _store_grads(grad_s_ptr, grad_t_ptr, g_off + start + cols, ok, ds, dt, e_s, e_t, log_zs, log_zt,
                             inv_zs, inv_zt, kl, gscale, STUDENT_GRAD, TEACHER_GRAD)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[G, B, C] -> [G * B, C] with unit column stride (a view when possible, else a contiguous copy)."""
    flat = x.reshape(-1, x.shape[-1])
    return flat if flat.stride(-1) == 1 or flat.shape[-1] <= 1 else flat.contiguous()


def distill_kl_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float, weights: torch.Tensor | None,
                    factor: float, student_grad: bool,
                    teacher_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row T^2 * KL(p_t || p_s) and the scaled row gradients, in one launch.

    student, teacher: [G, B, C] (same shape and dtype); weights: [G] float32/float64 or None; the gradients are
    those of factor * w[g] * loss[g, b]  ->  loss_rows [G, B] float32 (float64 for float64 logits), grad_student
    and grad_teacher [G, B, C] in the logits dtype, float32 for float16 logits (empty [0] tensors when not asked
    for).
    """
    G, B, C = student.shape
    acc_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    grad_dtype = torch.float32 if student.dtype == torch.float16 else student.dtype
    loss = torch.empty((G, B), dtype=acc_dtype, device=student.device)
    grad_s = student.new_empty((G, B, C) if student_grad else (0,), dtype=grad_dtype)
    grad_t = teacher.new_empty((G, B, C) if teacher_grad else (0,), dtype=grad_dtype)
    if loss.numel() == 0:
        return loss, grad_s, grad_t
    s, t = _rows(student), _rows(teacher)
    block = min(triton.next_power_of_2(C), MAX_BLOCK)
    num_warps = max(1, min(16, block // 512))
    with on_device(student):
        _distill_kl_kernel[(G * B,)](
            loss, grad_s, grad_t, s, t, weights.contiguous() if weights is not None else loss, s.stride(0),
            t.stride(0), C, B, 1.0 / temperature, temperature, factor,
            STUDENT_GRAD=student_grad, TEACHER_GRAD=teacher_grad, HAS_WEIGHTS=weights is not None,
            ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32, BLOCK=block, SINGLE=C <= block,
            num_warps=num_warps,
        )
    return loss, grad_s, grad_t
