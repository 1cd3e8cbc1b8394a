"""Patch dropout / MAE random masking on masked_gather, for any ViT the adapter reads (timm, TransReID, CLIP...)."""

from __future__ import annotations

import torch
from torch import nn

from amfor.ops import masked_gather, random_masking


class PatchDropout(nn.Module):
    """Keep a random (or lowest-scoring) subset of patch tokens per image; prefix tokens (CLS, registers) stay.

    A drop-in for timm's `PatchDropout` (`vit.patch_drop`, applied after the position embedding was added):
    the prefix tokens and the kept patches are gathered in one pass, in ascending order, with no `cat`.
    `return_indices=True` also returns the kept patch indices [B, K] (patch numbering, prefix excluded), which
    `masked_scatter` takes to put the encoder output back on the grid, as MAE's decoder does.

    x: [B, P + N, D]  ->  [B, P + K, D] with K = max(1, int(N * (1 - prob))) while training; x unchanged in eval.
    `scores` [B, N] (e.g. the occluded fraction of each patch) keeps the K lowest-scoring patches instead.
    """

    def __init__(self, prob: float = 0.5, num_prefix_tokens: int = 1, ordered: bool = True,
                 return_indices: bool = False) -> None:
        super().__init__()
        if not 0.0 <= prob < 1.0:
            raise ValueError(f"prob must lie in [0, 1), got {prob}")
        self.prob = prob
        self.num_prefix_tokens = num_prefix_tokens
        self.ordered = ordered  # kept patches are always in ascending order; accepted for timm compatibility
        self.return_indices = return_indices

    def forward(self, x: torch.Tensor, scores: torch.Tensor | None = None):
        if not self.training or self.prob == 0.0:
            return (x, None) if self.return_indices else x
        B, L, _ = x.shape
        P = self.num_prefix_tokens
        N = L - P
        keep = max(1, int(N * (1.0 - self.prob)))
        index, _ = random_masking(B, N, keep, scores=scores, device=x.device)
        prefix = torch.arange(P, device=x.device).expand(B, P)
        out = masked_gather(x, torch.cat([prefix, index + P], dim=1), check_index=False)
        return (out, index) if self.return_indices else out

    def extra_repr(self) -> str:
        return f"prob={self.prob}, num_prefix_tokens={self.num_prefix_tokens}"


def apply_patch_dropout(vit: nn.Module, prob: float) -> nn.Module:
    """Give a ViT our PatchDropout, where its own forward passes the embedded tokens (`amfor.nn.vit_adapter`).

    A timm VisionTransformer running timm's forward: its `patch_drop` is replaced. Any other ViT (TransReID, PASS,
    HAP and other timm subclasses with their own forward, CLIP's visual ViT, amfor's ReIDViT): the dropout is
    registered as `vit.patch_dropout` (no weights: the state dict is unchanged) and runs as a forward hook after
    `pos_drop` (CLIP: `ln_pre`), i.e. after the position and side embeddings, before the blocks. Applying it again
    replaces the previous one. A model of no known layout: `ViTLayoutError` naming what it lacks.
    """
    from amfor.nn.vit_adapter import ViTLayoutError, describe_vit, layout_error

    try:
        parts = describe_vit(vit)
    except ViTLayoutError:
        raise layout_error(vit, "apply_patch_dropout (no timm `patch_drop` either)") from None
    if parts.drop_site == "patch_drop":
        vit.patch_drop = PatchDropout(prob, num_prefix_tokens=getattr(vit, "num_prefix_tokens", 1)).train(vit.training)
        return vit
    if parts.drop_site is None:
        raise ViTLayoutError(f"apply_patch_dropout: {type(vit).__name__} has no `pos_drop` (or CLIP `ln_pre`) to put "
                             f"patch dropout after")
    site = getattr(vit, parts.drop_site)
    for key, hook in list(site._forward_hooks.items()):  # a previous call's hook (found by its owner: deepcopy-safe)
        if isinstance(getattr(hook, "__self__", None), HookedPatchDropout):
            del site._forward_hooks[key]
    drop = HookedPatchDropout(prob, num_prefix_tokens=parts.num_prefix_tokens).train(vit.training)  # the model's mode
    site.register_forward_hook(drop.hook)
    vit.patch_dropout = drop
    return vit


class HookedPatchDropout(PatchDropout):
    """PatchDropout run by a forward hook on the module after which the tokens are complete (`apply_patch_dropout`);
    `enabled = False` passes tokens through (the masked and pooled views choose their tokens themselves)."""

    def __init__(self, prob: float, num_prefix_tokens: int) -> None:
        super().__init__(prob, num_prefix_tokens)
        self.enabled = True

    def hook(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        return self(output) if self.enabled else output
