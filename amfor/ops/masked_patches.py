"""Masked patch gathering and scattering: the token bookkeeping of masked image modelling (MAE) in one pass.

- `masked_gather(x, index, pos_embed)`: the kept tokens of each image, `[B, N, D] -> [B, K, D]`, with the
  position embedding of each kept token added (the encoder input of MAE).
- `masked_scatter(y, index, num_tokens, mask_token, pos_embed)`: the kept tokens put back on the full grid,
  a mask token everywhere else, plus the position embedding (MAE's decoder input: cat + unshuffle + add).
- `random_masking(...)`: which tokens to keep, uniformly at random or the lowest-scoring ones.

The reference implementations come first and are the specification. The public functions validate their
input and dispatch (amfor.ops._registry) to the reference, the Triton kernels (amfor.kernels.masked_patches)
or the C++/CUDA kernels of `amfor._C` (`torch.ops.amfor.masked_gather`, ...). Every compiled path is a
torch.library op with a fake implementation and autograd, so it works under torch.compile(fullgraph=True).
Backward never uses atomics: the x-gradient of masked_gather sums repeated indices in increasing k order.
"""

from __future__ import annotations

import torch

from amfor.ops import _registry

AUTO_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpp",)}
GATHER = _registry.declare("masked_gather", AUTO_ORDER)
SCATTER = _registry.declare("masked_scatter", AUTO_ORDER)


# ---------------------------------------------------------------------------------------------------------
# Reference (the specification)
# ---------------------------------------------------------------------------------------------------------
def masked_gather_reference(x: torch.Tensor, index: torch.Tensor,
                            pos_embed: torch.Tensor | None = None) -> torch.Tensor:
    """out[b, k] = x[b, index[b, k]] (+ pos_embed[index[b, k]]).

    x: [B, N, D]; index: [B, K] int; pos_embed: [N, D] or None  ->  [B, K, D]
    """
    idx = index.long()
    out = torch.gather(x, 1, idx[:, :, None].expand(-1, -1, x.shape[2]))
    if pos_embed is not None:
        out = out + pos_embed[idx]
    return out


def masked_scatter_reference(y: torch.Tensor, index: torch.Tensor, num_tokens: int, mask_token: torch.Tensor,
                             pos_embed: torch.Tensor | None = None) -> torch.Tensor:
    """out[b, index[b, k]] = y[b, k]; every other position mask_token; then + pos_embed everywhere.

    y: [B, K, D]; index: [B, K] int, unique per row; mask_token: [D]; pos_embed: [N, D] or None  ->  [B, N, D]
    """
    B, K, D = y.shape
    base = mask_token.to(y.dtype).expand(B, num_tokens, D)
    out = base.scatter(1, index.long()[:, :, None].expand(-1, -1, D), y)
    if pos_embed is not None:
        out = out + pos_embed
    return out


def masked_gather_backward_reference(grad: torch.Tensor, index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """grad_x[b, n] = sum over k with index[b, k] == n of grad[b, k].   grad: [B, K, D] -> [B, N, D]"""
    B, K, D = grad.shape
    out = torch.zeros(B, num_tokens, D, dtype=torch.float32, device=grad.device)
    out.scatter_add_(1, index.long()[:, :, None].expand(-1, -1, D), grad.float())
    return out.to(grad.dtype)


def random_masking(batch_size: int, num_tokens: int, num_keep: int, *, scores: torch.Tensor | None = None,
                   generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose the tokens each image keeps.

    Without `scores` the K kept tokens are uniform at random; with `scores` [B, N] the K lowest-scoring
    tokens are kept (occlusion-driven masking: score = occluded fraction), ties going to the lower position.
    Returns index [B, K] int64, ascending per row, and mask [B, N] bool, True where a token is masked.
    """
    if not 0 <= num_keep <= num_tokens:
        raise ValueError(f"num_keep must lie in [0, num_tokens={num_tokens}], got {num_keep}")
    if scores is None:
        if device is None and generator is not None:
            device = generator.device
        scores = torch.rand(batch_size, num_tokens, generator=generator, device=device)
    elif tuple(scores.shape) != (batch_size, num_tokens):
        raise ValueError(f"scores must have shape [batch_size, num_tokens] = [{batch_size}, {num_tokens}], "
                         f"got {list(scores.shape)}")
    keep = torch.sort(scores, dim=1, stable=True).indices[:, :num_keep]
    index = torch.sort(keep, dim=1).values
    mask = torch.ones(batch_size, num_tokens, dtype=torch.bool, device=scores.device)
    mask.scatter_(1, index, False)
    return index, mask


# ---------------------------------------------------------------------------------------------------------
# Input validation (the public functions run it before any backend)
# ---------------------------------------------------------------------------------------------------------
def _check_tokens(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(f"{name} must be [B, tokens, D], got shape {list(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_index(index: torch.Tensor, batch: int, num_tokens: int, device: torch.device, check_values: bool,
                 unique: bool) -> None:
    if not isinstance(index, torch.Tensor) or index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"index must be an int32 or int64 tensor, got {getattr(index, 'dtype', type(index))}")
    if index.dim() != 2 or index.shape[0] != batch:
        raise ValueError(f"index must be [B, K] with B = {batch}, got shape {list(index.shape)}")
    if index.device != device:
        raise ValueError(f"index is on {index.device} but the tokens are on {device}")
    if not check_values or index.numel() == 0 or torch.compiler.is_compiling() or _capturing(device):
        return
    if bool(((index < 0) | (index >= num_tokens)).any()):
        raise ValueError(f"index values must lie in [0, {num_tokens}), "
                         f"got min {int(index.min())} max {int(index.max())}")
    if unique and index.shape[1] > 1:
        ordered = torch.sort(index, dim=1).values
        if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            raise ValueError("index must hold unique values in every row for masked_scatter")


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _flat_pos_embed(pos_embed: torch.Tensor | None, num_tokens: int, ref: torch.Tensor) -> torch.Tensor | None:
    """pos_embed [N, D] or [1, N, D] -> [N, D] in ref's dtype, with a clear error on a mismatch."""
    if pos_embed is None:
        return None
    D = ref.shape[2]
    if pos_embed.dim() == 3 and pos_embed.shape[0] == 1:
        pos_embed = pos_embed[0]
    if tuple(pos_embed.shape) != (num_tokens, D):
        raise ValueError(f"pos_embed must be [N, D] or [1, N, D] with N = {num_tokens}, D = {D}, "
                         f"got shape {list(pos_embed.shape)}")
    if pos_embed.device != ref.device:
        raise ValueError(f"pos_embed is on {pos_embed.device} but the tokens are on {ref.device}")
    return pos_embed.to(ref.dtype)


# ---------------------------------------------------------------------------------------------------------
# Triton ops (torch.library custom ops around amfor.kernels.masked_patches)
# ---------------------------------------------------------------------------------------------------------
def _segments(index: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """perm [B, K]: k ordered by (index, k); starts [B, N + 1]: where each token's segment of perm begins."""
    idx = index.long()
    ordered, perm = torch.sort(idx, dim=1, stable=True)
    bounds = torch.arange(num_tokens + 1, device=idx.device).expand(idx.shape[0], -1).contiguous()
    starts = torch.searchsorted(ordered.contiguous(), bounds)
    return perm, starts


def _inverse_index(index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """inverse[b, n] = k where index[b, k] == n, else -1.   index: [B, K] (unique per row) -> [B, N] int64"""
    B, K = index.shape
    inverse = torch.full((B, num_tokens), -1, dtype=torch.int64, device=index.device)
    return inverse.scatter(1, index.long(), torch.arange(K, device=index.device).expand(B, K))


@torch.library.custom_op("amfor::masked_gather_triton", mutates_args=())
def _masked_gather_triton(x: torch.Tensor, index: torch.Tensor, pos_embed: torch.Tensor | None) -> torch.Tensor:
    from amfor.kernels import masked_patches as kernels

    return kernels.gather_rows(x, index, None, pos_embed, pos_by_output=False)


@torch.library.custom_op("amfor::masked_scatter_triton", mutates_args=())
def _masked_scatter_triton(y: torch.Tensor, index: torch.Tensor, num_tokens: int, mask_token: torch.Tensor,
                           pos_embed: torch.Tensor | None) -> torch.Tensor:
    from amfor.kernels import masked_patches as kernels

    inverse = _inverse_index(index, num_tokens)
    return kernels.gather_rows(y, inverse, mask_token.contiguous(), pos_embed, pos_by_output=True)


@torch.library.custom_op("amfor::masked_gather_backward_triton", mutates_args=())
def _masked_gather_backward_triton(grad: torch.Tensor, index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    from amfor.kernels import masked_patches as kernels

    perm, starts = _segments(index, num_tokens)
    return kernels.segment_sum_rows(grad, perm, starts, num_tokens)


# ---------------------------------------------------------------------------------------------------------
# Fake implementations and autograd, shared by the Triton ops and the C++/CUDA ops of amfor._C
# ---------------------------------------------------------------------------------------------------------
def _fake_gather(x, index, pos_embed):
    return x.new_empty(x.shape[0], index.shape[1], x.shape[2])


def _fake_scatter(y, index, num_tokens, mask_token, pos_embed):
    return y.new_empty(y.shape[0], num_tokens, y.shape[2])


def _fake_gather_backward(grad, index, num_tokens):
    return grad.new_empty(grad.shape[0], num_tokens, grad.shape[2])


def _setup_gather(ctx, inputs, output):
    x, index, pos_embed = inputs
    ctx.save_for_backward(index)
    ctx.num_tokens = x.shape[1]
    ctx.has_pos = pos_embed is not None


def _setup_scatter(ctx, inputs, output):
    y, index, num_tokens, mask_token, pos_embed = inputs
    ctx.save_for_backward(index)
    ctx.has_pos = pos_embed is not None


def _gather_backward(ops: dict):
    backward_op = ops["masked_gather_backward"]

    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        grad_x = backward_op(grad.contiguous(), index, ctx.num_tokens)
        grad_pos = None
        if ctx.has_pos and ctx.needs_input_grad[2]:
            grad_pos = grad_x.sum(0, dtype=torch.float32).to(grad.dtype)
        return grad_x if ctx.needs_input_grad[0] else None, None, grad_pos

    return backward


def _scatter_backward(ops: dict):
    gather_op = ops["masked_gather"]

    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        grad = grad.contiguous()
        grad_y = gather_op(grad, index, None) if ctx.needs_input_grad[0] else None
        grad_mask = None
        if ctx.needs_input_grad[3]:
            kept = torch.zeros(grad.shape[:2], dtype=torch.bool, device=grad.device).scatter_(1, index.long(), True)
            grad_mask = grad.masked_fill(kept[:, :, None], 0).sum((0, 1), dtype=torch.float32).to(grad.dtype)
        grad_pos = grad.sum(0, dtype=torch.float32).to(grad.dtype) if ctx.has_pos and ctx.needs_input_grad[4] else None
        return grad_y, None, None, grad_mask, grad_pos

    return backward


SPECS = (
    _registry.OpSpec("masked_gather", _fake_gather, _setup_gather, _gather_backward),
    _registry.OpSpec("masked_scatter", _fake_scatter, _setup_scatter, _scatter_backward),
    _registry.OpSpec("masked_gather_backward", _fake_gather_backward),
)
_TRITON = _registry.register_implementation(SPECS, "_triton")
_COMPILED = _registry.register_implementation(SPECS, "")


def _ops(backend: str) -> dict:
    """{op name: callable} of a non-reference backend."""
    return _TRITON if backend == "triton" else _COMPILED


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------
def masked_gather(x: torch.Tensor, index: torch.Tensor, pos_embed: torch.Tensor | None = None, *,
                  check_index: bool = True) -> torch.Tensor:
    """The kept tokens of each image, with their position embedding added.

    x: [B, N, D] float; index: [B, K] int32/int64 in [0, N) (repeats allowed: their gradients add up);
    pos_embed: [N, D], [1, N, D] or None  ->  out [B, K, D], out[b, k] = x[b, index[b, k]] + pos_embed[index[b, k]].
    check_index=False skips the value check of `index` (a device sync on CUDA); it is skipped anyway
    under torch.compile and CUDA-graph capture.
    """
    _check_tokens(x, "x")
    B, N, _ = x.shape
    _check_index(index, B, N, x.device, check_index, unique=False)
    pos = _flat_pos_embed(pos_embed, N, x)
    backend = GATHER.backend(x.device, x.dtype)
    if backend == "torch":
        return masked_gather_reference(x, index, pos)
    return _ops(backend)["masked_gather"](x.contiguous(), index.contiguous(), pos)


def masked_scatter(y: torch.Tensor, index: torch.Tensor, num_tokens: int, mask_token: torch.Tensor,
                   pos_embed: torch.Tensor | None = None, *, check_index: bool = True) -> torch.Tensor:
    """The kept tokens back on the full grid, mask_token elsewhere, plus pos_embed: MAE's decoder input.

    y: [B, K, D] float; index: [B, K] int32/int64, unique per row, in [0, num_tokens); mask_token: [D]
    (or any shape of D values, e.g. [1, 1, D]); pos_embed: [N, D], [1, N, D] or None  ->  out [B, N, D].
    """
    _check_tokens(y, "y")
    B, K, D = y.shape
    if num_tokens < K:
        raise ValueError(f"num_tokens ({num_tokens}) must be at least the number of kept tokens K = {K}")
    _check_index(index, B, num_tokens, y.device, check_index, unique=True)
    if index.shape[1] != K:
        raise ValueError(f"index must be [B, K] = [{B}, {K}] like y, got shape {list(index.shape)}")
    if not isinstance(mask_token, torch.Tensor) or mask_token.numel() != D or mask_token.device != y.device:
        raise ValueError(f"mask_token must hold D = {D} values on {y.device}, got "
                         f"{list(getattr(mask_token, 'shape', []))} on {getattr(mask_token, 'device', None)}")
    token = mask_token.reshape(D).to(y.dtype)
    pos = _flat_pos_embed(pos_embed, num_tokens, y)
    backend = SCATTER.backend(y.device, y.dtype)
    if backend == "torch":
        return masked_scatter_reference(y, index, num_tokens, token, pos)
    return _ops(backend)["masked_scatter"](y.contiguous(), index.contiguous(), num_tokens, token, pos)
