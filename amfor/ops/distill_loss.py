"""Multi-granularity distillation loss: temperature-scaled KL(teacher || student) over identity logits.

    loss = sum_g w_g * T^2 * sum_b KL(p_t[g, b] || p_s[g, b]) / B,      p = softmax(logits / T) over C

for G granularities (global, each part, foreground, ...) of B samples and C identities. In eager PyTorch this
is a chain of ~10 memory-bound kernels per direction; the fused kernels (one program per row of C classes)
read each logit once from memory and, in the same launch as the forward, write the gradient of the final
loss (weights and reduction folded in) in the logits dtype, or in float32 for float16 logits (`grad_dtype`:
the gradient before the AMP loss scale, ~T / (B C), is a float16 subnormal), so that the backward is only
"stored gradient x grad_output", rounded once to the logits dtype: exact for bfloat16/float32 and grad_output = 1
or any power of two (AMP loss scales).

- `distill_kl_loss(student, teacher, temperature, weights, reduction)`: the public op.
- `distill_kl_loss_reference(...)`: the specification in plain PyTorch (log_softmax of both, then the sum).

Layers: the reference first; input validation; the Triton op (`amfor::distill_kl_loss_triton`, a custom op around
amfor.kernels.distill_loss) and the C++/CUDA op (`amfor::distill_kl_loss` of amfor._C), which both return
(loss, per-row losses when weights are given, grad_student, grad_teacher), with one shared fake kernel and
autograd formula: grad_output x the stored gradients for the logits, the per-granularity losses for the weights.

Semantics of special values: teacher logits of -inf are classes of probability zero (0 * log 0 = 0, no NaN);
a row whose teacher logits are all -inf contributes loss 0 and zero gradients (a way to mask rows out; it
still counts in the batchmean's B). Student logits must be finite where the teacher's probability is not 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from amfor.ops import _registry

# Measured order of preference per device type (see docs/distill_loss.md). CPU (AMD EPYC, AVX2 + FMA, 2026-12-06,
# logits [10, 64, 170] and [4, 256, 751], fp32 and bf16, temperature 4): cpp 3.5-17x faster than torch by best-of
# on one thread (fp32 [4, 256, 751] forward + backward 2.2-2.6 ms vs 14.6-15.3 ms), 2.6-71x on two; before the
# per-ISA kernel it was 0.83-1.33x, slower than torch in 7 of 16 one-thread cases. On CUDA nothing could be
# measured yet: triton first because its kernel is exercised by CI under the interpreter, the CUDA kernel only
# compiled.
AUTO_ORDER = {"cuda": ("triton", "cuda"), "cpu": ("cpp",)}
DISPATCH = _registry.declare("distill_kl_loss", AUTO_ORDER)
REDUCTIONS = ("batchmean", "sum", "none")


# ---------------------------------------------------------------------------------------------------------
# Reference (the specification)
# ---------------------------------------------------------------------------------------------------------
def distill_kl_rows_reference(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row T^2 * KL(p_t || p_s) with p = softmax(logits / T), accumulated in float32 (float64 for float64).

    student, teacher: [..., C]  ->  [...]
    """
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    s, t = student.to(acc) / temperature, teacher.to(acc) / temperature
    empty = (t == float("-inf")).all(-1, keepdim=True)  # no teacher distribution at all: the row adds 0
    log_p_s = F.log_softmax(s, dim=-1)
    log_p_t = F.log_softmax(t.masked_fill(empty, 0.0), dim=-1)
    # Classes the teacher rules out (p_t == 0, e.g. -inf logits) add nothing: 0 * log 0 = 0. Masking both
    # factors keeps NaN out of the value and out of the gradient.
    kept = (log_p_t.exp() > 0) & ~empty
    p_t = torch.where(kept, log_p_t.exp(), 0.0)
    kl = (p_t * torch.where(kept, log_p_t - log_p_s, 0.0)).sum(-1)
    return kl * temperature**2


def reduce_rows(rows: torch.Tensor, weights: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Weights and reduction over the per-row losses.   rows: [G, B]; weights: [G] or None.

    batchmean -> sum_g w_g sum_b rows[g, b] / max(B, 1) (scalar); sum -> the same without / B;
    none -> rows[g, b] * w_g ([G, B]).
    """
    if weights is not None:
        rows = rows * weights[:, None]
    if reduction == "none":
        return rows
    total = rows.sum()
    return total / max(rows.shape[1], 1) if reduction == "batchmean" else total


def distill_kl_loss_reference(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
                              weights: torch.Tensor | None = None, reduction: str = "batchmean") -> torch.Tensor:
    """The specification of distill_kl_loss: student, teacher [G, B, C] or [B, C]; weights [G] or None.

    Returns a scalar (batchmean, sum), or [G, B] / [B] (none); float32 (float64 for float64 logits).
    """
    squeeze = student.dim() == 2
    rows = distill_kl_rows_reference(student, teacher, temperature)
    rows = rows[None] if squeeze else rows
    out = reduce_rows(rows, None if weights is None else weights.reshape(-1), reduction)
    return out[0] if squeeze and reduction == "none" else out


# ---------------------------------------------------------------------------------------------------------
# Input validation (the public function runs it before any backend)
# ---------------------------------------------------------------------------------------------------------
def _check_logits(student: torch.Tensor, teacher: torch.Tensor) -> None:
    for name, t in (("student", student), ("teacher", teacher)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise TypeError(f"{name} must be float32, float16, bfloat16 or float64 logits, got {t.dtype}")
        if t.dim() not in (2, 3):
            raise ValueError(f"{name} must be [G, B, C] or [B, C] logits, got shape {list(t.shape)}")
    if student.shape != teacher.shape:
        raise ValueError(f"teacher shape {list(teacher.shape)} differs from student shape {list(student.shape)}")
    if teacher.dtype != student.dtype:
        raise TypeError(f"teacher dtype {teacher.dtype} differs from student dtype {student.dtype}")
    if teacher.device != student.device:
        raise ValueError(f"teacher is on {teacher.device} but student is on {student.device}")
    if student.shape[-1] == 0:
        raise ValueError("student and teacher need at least one class (C >= 1), got C = 0")


def _check_options(temperature: float, weights: torch.Tensor | None, reduction: str, student: torch.Tensor) -> None:
    if isinstance(temperature, torch.Tensor) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a Python float, got {type(temperature).__name__}")
    if not 0 < temperature < float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if weights is None:
        return
    G = student.shape[0] if student.dim() == 3 else 1
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
        raise TypeError(f"weights must be a floating-point tensor of shape [G] or None, got {weights!r:.80}")
    if weights.dim() > 1 or weights.numel() != G:
        raise ValueError(f"weights must have shape [G] = [{G}], got {list(weights.shape)}")
    if weights.device != student.device:
        raise ValueError(f"weights is on {weights.device} but student is on {student.device}")


# ---------------------------------------------------------------------------------------------------------
# Triton op (a torch.library custom op around amfor.kernels.distill_loss)
# ---------------------------------------------------------------------------------------------------------
def grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the fused ops store the logits' gradient in: the logits dtype, float32 for float16 logits.

    The gradient of a batchmean loss is ~T / (B C) per entry (3e-6 at B = 64, C = 4101): below float16's
    smallest normal (6e-5), so rounding it to float16 before the loss scale lifts it lost digits or flushed it to
    zero (measured at T = 2 and a 2^16 scale: 3.9% of the entries off by more than 10%, 0.8% zero; the reference
    path: none). bfloat16 has float32's range: kept.
    """
    return torch.float32 if dtype == torch.float16 else dtype


def _grad_factor(reduction: str, batch: int) -> float:
    """d loss / d (w_g * rows[g, b]) of the reduction: 1 / B for batchmean, 1 for sum and none."""
    return 1.0 / max(batch, 1) if reduction == "batchmean" else 1.0


def _reduce_in_op(rows: torch.Tensor, weights: torch.Tensor | None,
                  reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, rows output) of the fused ops: rows are returned only when weights need them (no aliasing)."""
    return reduce_rows(rows, weights, reduction), rows if weights is not None else rows.new_empty(0)


@torch.library.custom_op("amfor::distill_kl_loss_triton", mutates_args=())
def _distill_kl_loss_triton(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                            weights: torch.Tensor | None, reduction: str, student_grad: bool,
                            teacher_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from amfor.kernels import distill_loss as kernels

    factor = _grad_factor(reduction, student.shape[1])
    rows, grad_s, grad_t = kernels.distill_kl_rows(student, teacher, temperature, weights, factor, student_grad,
                                                   teacher_grad)
    loss, rows_out = _reduce_in_op(rows, weights, reduction)
    return loss, rows_out, grad_s, grad_t


# ---------------------------------------------------------------------------------------------------------
# Fake implementation and autograd, shared by the Triton op and the C++/CUDA op of amfor._C
# ---------------------------------------------------------------------------------------------------------
def _fake(student, teacher, temperature, weights, reduction, student_grad, teacher_grad):
    G, B, _ = student.shape
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    loss = student.new_empty((G, B) if reduction == "none" else (), dtype=acc)
    rows = student.new_empty((G, B) if weights is not None else (0,), dtype=acc)
    gd = grad_dtype(student.dtype)
    grad_s = student.new_empty(student.shape if student_grad else (0,), dtype=gd)
    grad_t = teacher.new_empty(teacher.shape if teacher_grad else (0,), dtype=gd)
    return loss, rows, grad_s, grad_t


def _setup(ctx, inputs, output):
    student, teacher, temperature, weights, reduction, student_grad, teacher_grad = inputs
    _, rows, grad_s, grad_t = output
    ctx.mark_non_differentiable(rows, grad_s, grad_t)
    ctx.set_materialize_grads(False)  # no [G, B, C] zero tensors for the gradients of the gradient outputs
    # The logits are kept only when the forward was told not to compute a gradient that autograd may ask for
    # (a direct call of the op with the flags off): the backward then recomputes it.
    recompute = (student.requires_grad and not student_grad) or (teacher.requires_grad and not teacher_grad)
    ctx.save_for_backward(student if recompute else None, teacher if recompute else None, weights, rows, grad_s,
                          grad_t)
    ctx.temperature, ctx.reduction, ctx.dtype = temperature, reduction, student.dtype


def _scaled(grad: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """grad * scale rounded once to the logits' dtype (a new tensor: the stored gradient is kept).

    grad: the stored gradient (float32 for float16 logits, else the logits dtype); scale: grad_output.
    """
    return torch.mul(grad, scale, out=torch.empty_like(grad, dtype=dtype))


def _weights_grad(rows: torch.Tensor, grad: torch.Tensor, reduction: str) -> torch.Tensor:
    """d loss / d weights: rows [G, B] (un-weighted), grad: the loss's gradient (scalar, or [G, B] for none)."""
    if reduction == "none":
        return (rows * grad).sum(1)
    return rows.sum(1) * (grad * _grad_factor(reduction, rows.shape[1]))


def _backward(ops: dict):
    op = next(iter(ops.values()))

    def backward(ctx, grad_loss, _grad_rows, _grad_s, _grad_t):
        if grad_loss is None:  # the loss did not reach the output (grads are not materialised as zeros)
            return None, None, None, None, None, None, None
        student, teacher, weights, rows, grad_s, grad_t = ctx.saved_tensors
        need_s, need_t, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        if (need_s and grad_s.dim() != 3) or (need_t and grad_t.dim() != 3):  # the forward had the flags off
            _, _, grad_s, grad_t = op(student, teacher, ctx.temperature, weights, ctx.reduction, need_s, need_t)
        scale = grad_loss.unsqueeze(-1) if ctx.reduction == "none" else grad_loss
        grad_w = _weights_grad(rows, grad_loss, ctx.reduction) if need_w else None
        return (_scaled(grad_s, scale, ctx.dtype) if need_s else None,
                _scaled(grad_t, scale, ctx.dtype) if need_t else None, None, grad_w, None, None, None)

    return backward


SPECS = (_registry.OpSpec("distill_kl_loss", _fake, _setup, _backward),)
_TRITON = _registry.register_implementation(SPECS, "_triton")["distill_kl_loss"]
_COMPILED = (_registry.register_implementation(SPECS, "") or {}).get("distill_kl_loss")


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------
def distill_kl_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
                    weights: torch.Tensor | None = None, reduction: str = "batchmean") -> torch.Tensor:
    """Temperature-scaled KL(p_t || p_s) between teacher and student logits, over G granularities.

    student, teacher: [G, B, C] or [B, C] logits (same shape, dtype and device; float32/16, bfloat16, float64).
    weights: None (1 each) or [G] (differentiable: learned granularity weights; [1] for 2-d logits).
    reduction: "batchmean" -> sum_g w_g * T^2 * sum_b KL_gb / B (scalar); "sum" -> without the / B;
    "none" -> [G, B] ([B] for 2-d input) with row g scaled by w_g.
    The result is float32 (float64 for float64 logits). Gradients flow to the student, to the teacher when it
    requires grad (self-distillation without stop-gradient) and to the weights. With a fused backend the
    forward computes the logits' gradient in the same launch; the backward only scales it by grad_output.
    """
    _check_logits(student, teacher)
    _check_options(temperature, weights, reduction, student)
    temperature = float(temperature)
    squeeze = student.dim() == 2
    s3, t3 = (student[None], teacher[None]) if squeeze else (student, teacher)
    w = None if weights is None else weights.reshape(-1)
    backend = DISPATCH.backend(student.device, student.dtype)
    if backend == "torch":
        out = reduce_rows(distill_kl_rows_reference(s3, t3, temperature), w, reduction)
    else:
        acc = torch.float64 if student.dtype == torch.float64 else torch.float32
        grad_on = torch.is_grad_enabled()
        op = _TRITON if backend == "triton" else _COMPILED
        out = op(s3, t3, temperature, None if w is None else w.to(acc), reduction,
                 grad_on and student.requires_grad, grad_on and teacher.requires_grad)[0]
    return out[0] if squeeze and reduction == "none" else out
