"""AMGDLoss: adaptive multi-granularity distillation (docs/spec.md section 6), usable by any teacher-student model.

Two terms over G granularities (for AMFOR: the global feature, each part, the foreground feature):

- feature level (masked generative distillation with a learned mask): the student features [B, G, D] are
  masked channel-wise by a learned mask (learnable per-granularity queries added to the detached student
  features -> one self-attention layer over the G granularity tokens -> Linear -> sigmoid -> threshold lambda,
  with a straight-through estimator), a small generation block (Conv1d, ReLU, Conv1d over the granularity axis)
  regenerates them, and the distance is the per-granularity mean squared error to the stop-gradient teacher
  features;
- logit level: temperature-scaled KL(teacher || student) between identity logits [G, B, C], through the fused
  op `amfor.ops.distill_kl_loss` (forward and gradient in one kernel launch).

Each term sums its G per-granularity losses with adaptive weights w = G * softmax(theta) (mean 1, so that at
initialisation the term is the plain sum over granularities). Two separate sets of logits theta are learned, one
per term: the two terms have different per-granularity scales, and one shared set would follow whichever term
varies more. Learned softmax weights that only minimise the loss collapse onto the easiest granularity, so
`weight_reg` (default 1.0) adds weight_reg * KL(softmax(theta) || uniform) per set, zero at uniform weights;
the stationary weights are then w_g proportional to exp(-G * loss_g / weight_reg). See docs/distill_loss.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from amfor.ops import distill_kl_loss

Granularities = torch.Tensor | Mapping[str, torch.Tensor]


class AMGDOutput(NamedTuple):
    """The loss to backpropagate and its parts (detach them for logging)."""

    loss: torch.Tensor  # scalar: feature_weight * feature + logit_weight * logit + weight_reg * (KL terms)
    feature: torch.Tensor  # scalar: sum_g w_g * MSE(generated_g, teacher_g)
    logit: torch.Tensor  # scalar: sum_g w'_g * T^2 * KL(p_t || p_s) / B (0 without logits)
    feature_weights: torch.Tensor  # [G]: w = G * softmax(theta_feature)
    logit_weights: torch.Tensor  # [G]: w' = G * softmax(theta_logit)
    keep_ratio: torch.Tensor  # scalar: fraction of student feature channels the learned mask kept


def stack_granularities(x: Granularities, name: str, batch_first: bool = True) -> torch.Tensor:
    """A tensor, or a mapping of granularities, as one tensor.

    Mapping values are [B, D] (one granularity) or [B, k, D] (k granularities, e.g. the parts), concatenated in
    the mapping's order into [B, G, D]; a tensor is taken as it is. With batch_first=False the result is
    [G, B, D] (the layout of logits for distill_kl_loss): pass logits as a [G, B, C] tensor to avoid a copy.
    """
    if isinstance(x, torch.Tensor):
        if x.dim() != 3:
            raise ValueError(f"{name} must be a 3-d tensor or a mapping of granularities, got shape {list(x.shape)}")
        return x
    if not isinstance(x, Mapping) or not x:
        raise TypeError(f"{name} must be a tensor or a non-empty mapping of tensors, got {type(x).__name__}")
    parts = []
    for key, value in x.items():
        if not isinstance(value, torch.Tensor) or value.dim() not in (2, 3):
            raise ValueError(f"{name}[{key!r}] must be a [B, D] or [B, k, D] tensor, got "
                             f"{list(getattr(value, 'shape', []))}")
        parts.append(value[:, None] if value.dim() == 2 else value)
    stacked = torch.cat(parts, dim=1)
    return stacked if batch_first else stacked.transpose(0, 1)


class LearnedMask(nn.Module):
    """Channel mask [B, G, D] from learnable queries and one self-attention layer over the granularities.

    Forward value: the hard mask (probability > threshold); gradient: the probability's (straight-through).
    """

    def __init__(self, dim: int, num_granularities: int, num_heads: int = 8, threshold: float = 0.5):
        super().__init__()
        self.threshold = threshold
        self.queries = nn.Parameter(torch.zeros(num_granularities, dim))
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.head = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.queries, std=0.02)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)  # probabilities near 0.5 at first: about half the channels kept

    def forward(self, student: torch.Tensor) -> torch.Tensor:
        """student: [B, G, D] (read detached: the mask learns from the loss, not by moving the student)."""
        x = student.detach() + self.queries
        h = self.norm(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        prob = torch.sigmoid(self.head(x))
        hard = (prob > self.threshold).to(prob.dtype)
        return hard + prob - prob.detach()


class GenerationBlock(nn.Module):
    """Conv1d -> ReLU -> Conv1d over the granularity axis: [B, G, D] -> [B, G, D_out].

    kernel_size 3 lets neighbouring granularities (parts are ordered head to feet) help regenerate masked
    channels; kernel_size 1 is a per-granularity MLP shared by all granularities.
    """

    def __init__(self, dim: int, out_dim: int, hidden: int | None = None, kernel_size: int = 3):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd (same-length output), got {kernel_size}")
        hidden = hidden or dim
        self.conv1 = nn.Conv1d(dim, hidden, kernel_size, padding=kernel_size // 2)
        self.conv2 = nn.Conv1d(hidden, out_dim, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_over_granularities(F.relu(conv_over_granularities(x, self.conv1)), self.conv2)


def conv_over_granularities(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """`conv` (stride 1, same padding) along the granularity axis of x [B, G, D_in] -> [B, G, D_out], computed as
    one matrix product of the zero-padded k-windows [B, G, k * D_in] with the kernel [D_out, k * D_in]: the same
    sums as `conv(x.transpose(1, 2)).transpose(1, 2)`, but a GEMM rather than a convolution over a length-G signal
    (G = P + 2 = 10 for AMFOR: the block's forward + backward took 14.1 ms against 21.7 ms as oneDNN convolutions,
    one thread, AVX2; docs/model.md, "Training-step cost")."""
    k, G = conv.kernel_size[0], x.shape[1]
    padded = F.pad(x, (0, 0, k // 2, k // 2))  # [B, G + k - 1, D_in]
    windows = torch.cat([padded[:, j:j + G] for j in range(k)], dim=-1)  # [B, G, k * D_in], tap-major
    return F.linear(windows, conv.weight.permute(0, 2, 1).flatten(1), conv.bias)


class AMGDLoss(nn.Module):
    """Adaptive multi-granularity distillation: learned-mask generative feature term + fused logit KL term.

    dim: student feature width D; num_granularities: G; teacher_dim: teacher feature width (default D);
    num_heads: heads of the mask's self-attention (must divide D); mask_threshold: lambda;
    gen_kernel_size / gen_hidden: the generation block; temperature: T of the logit term;
    feature_weight / logit_weight: the two terms' factors; weight_reg: the weights' pull towards uniform;
    detach_teacher: stop the gradient into the teacher logits (teacher features are always stop-gradient).
    """

    def __init__(self, dim: int, num_granularities: int, *, teacher_dim: int | None = None, num_heads: int = 8,
                 mask_threshold: float = 0.5, gen_kernel_size: int = 3, gen_hidden: int | None = None,
                 temperature: float = 1.0, feature_weight: float = 1.0, logit_weight: float = 1.0,
                 weight_reg: float = 1.0, detach_teacher: bool = True):
        super().__init__()
        self.num_granularities = num_granularities
        self.temperature = temperature
        self.feature_weight, self.logit_weight, self.weight_reg = feature_weight, logit_weight, weight_reg
        self.detach_teacher = detach_teacher
        self.mask = LearnedMask(dim, num_granularities, num_heads, mask_threshold)
        self.generate = GenerationBlock(dim, teacher_dim or dim, gen_hidden, gen_kernel_size)
        self.feature_logits = nn.Parameter(torch.zeros(num_granularities))
        self.logit_logits = nn.Parameter(torch.zeros(num_granularities))

    def granularity_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(feature weights, logit weights), each [G] = G * softmax(theta): mean 1, learned."""
        G = self.num_granularities
        return G * self.feature_logits.softmax(0), G * self.logit_logits.softmax(0)

    def feature_distances(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-granularity MSE [G] of the regenerated masked student to the stop-gradient teacher; keep ratio.

        student: [B, G, D]; teacher: [B, G, D_teacher].
        """
        keep = self.mask(student)
        generated = self.generate(student * keep)
        dist = (generated.float() - teacher.detach().float()).pow(2).mean(dim=(0, 2))
        return dist, keep.detach().float().mean()

    def _weight_reg(self) -> torch.Tensor:
        """KL(softmax(theta) || uniform) summed over both sets: 0 at uniform weights."""
        log_g = math.log(self.num_granularities)
        reg = [(p.softmax(0) * (p.log_softmax(0) + log_g)).sum() for p in (self.feature_logits, self.logit_logits)]
        return reg[0] + reg[1]

    def forward(self, student_feats: Granularities, teacher_feats: Granularities,
                student_logits: Granularities | None = None,
                teacher_logits: Granularities | None = None) -> AMGDOutput:
        """The AMGD loss of one batch.

        student_feats / teacher_feats: [B, G, D] tensors, or mappings name -> [B, D] / [B, k, D] concatenated in
        order (e.g. {"global": g, "parts": parts, "foreground": fg}); student_logits / teacher_logits (optional,
        both or neither): [G, B, C] tensors, or mappings name -> [B, C] / [B, k, C] in the same order.
        """
        student = stack_granularities(student_feats, "student_feats")
        teacher = stack_granularities(teacher_feats, "teacher_feats")
        G = self.num_granularities
        if student.shape[:2] != teacher.shape[:2] or student.shape[1] != G:
            raise ValueError(f"student_feats {list(student.shape)} and teacher_feats {list(teacher.shape)} must be "
                             f"[B, G, *] with G = {G}")
        w_feat, w_logit = self.granularity_weights()
        dist, keep_ratio = self.feature_distances(student, teacher)
        feature = (w_feat * dist).sum()
        logit = feature.new_zeros(())
        if (student_logits is None) != (teacher_logits is None):
            raise ValueError("pass both student_logits and teacher_logits, or neither")
        if student_logits is not None:
            s_logits = stack_granularities(student_logits, "student_logits", batch_first=False)
            t_logits = stack_granularities(teacher_logits, "teacher_logits", batch_first=False)
            if s_logits.shape[0] != G:
                raise ValueError(f"logits must be [G, B, C] with G = {G}, got {list(s_logits.shape)}")
            t_logits = t_logits.detach() if self.detach_teacher else t_logits
            logit = distill_kl_loss(s_logits, t_logits, self.temperature, w_logit, "batchmean")
        loss = self.feature_weight * feature + self.logit_weight * logit + self.weight_reg * self._weight_reg()
        return AMGDOutput(loss, feature, logit, w_feat.detach(), w_logit.detach(), keep_ratio)
