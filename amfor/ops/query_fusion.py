"""Query fusion attention: a few queries attend over the tokens of several layers, mixed with layer weights.

    out[b, h, q] = sum_l w[b, q, l] * softmax_n(scale * q[b, h, q] . k[b, h', l, n] | mask) @ v[b, h', l, :]

with h' = h // (H / Hkv) the key/value head of head h. This is AMFOR's AMFF-Encoder (learnable queries over
the features of several transformer layers, adaptive layer weights) and, with L = 1, plain cross-attention
of few queries over many tokens (the part decoder, any ViT ReID decoder with learnable queries).
Few queries over many keys is memory-bound: the compiled kernels read every key/value token once.

Keys and values are either one tensor [B, Hkv, L, N, d] or a list of L tensors [B, Hkv, N, d] (one per
layer, so callers holding separate layer outputs need not stack them). The reference comes first and is
the specification. The public function validates and dispatches (amfor.ops._registry) to the reference,
Triton (amfor.kernels.query_fusion) or the C++/CUDA kernels of `amfor._C`
(`torch.ops.amfor.query_fusion_attention`). Each compiled path is a torch.library op with a fake kernel
and autograd; the forward also returns the per-(b, h, q, l) log-sum-exp, which the backward uses to
recompute the probabilities. Backward is deterministic and needs no atomics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from amfor.ops import _registry

# Measured on CPU (OpenMP build, docs/query_fusion.md, "Measured"): the C++ kernel beats the reference for float32
# (its blocked path, register-blocked per ISA). On an AVX2-only AMD EPYC (2026-12-06, 1 and 2 threads, the tiny
# model's training-step calls, `python -m benchmarks.query_fusion_model_shapes`, best of 12) cpp takes 0.45-0.77x
# the reference's time forward and 0.61-0.89x forward + backward (the projected path's, on one thread: a tie);
# before its AVX2 code was register-blocked for 16 ymm it took 2.5-6.4x (spills, no FMA). So cpu:float32
# stays cpp on AVX2 as on AVX-512 (the AMFF-Encoder's absorbed calls, where the time goes, gain most). Other
# dtypes run the plain per-row kernel, mostly slower than the reference, so auto keeps the reference for them.
# cuda: not measured; Triton has no float64 kernels, so float64 on CUDA takes the CUDA kernel (which has them).
AUTO_ORDER = {"cuda": ("triton", "cuda"), "cuda:float64": ("cuda",), "cpu:float32": ("cpp",), "cpu": ()}
MAX_HEAD_DIM = 1024  # the compiled kernels tile head dims up to this (the projection-absorbed path: d = D)
MAX_LAYERS = 32  # the CUDA kernels pass per-layer pointers by value
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DISPATCH = _registry.declare("query_fusion_attention", AUTO_ORDER,
                             dtypes={"triton": (torch.float32, torch.float16, torch.bfloat16)})
KV = torch.Tensor | Sequence[torch.Tensor]


# ---------------------------------------------------------------------------------------------------------
# Reference (the specification)
# ---------------------------------------------------------------------------------------------------------
def _layers(t: KV) -> list[torch.Tensor]:
    """[B, Hkv, L, N, d] or L x [B, Hkv, N, d]  ->  list of L views [B, Hkv, N, d]."""
    return list(t.unbind(2)) if isinstance(t, torch.Tensor) else list(t)


def broadcast_layer_weights(layer_weights: torch.Tensor | None, batch: int, num_queries: int, num_layers: int,
                            dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> torch.Tensor:
    """None (1/L each), [L], [B, L] or [B, Q, L]  ->  [B, Q, L] in `dtype`; differentiable (an expand)."""
    B, Q, L = batch, num_queries, num_layers
    if layer_weights is None:
        return torch.full((B, Q, L), 1.0 / L, dtype=dtype, device=device)
    w = layer_weights.to(dtype)
    if w.dim() == 1 and w.shape[0] == L:
        return w.expand(B, Q, L)
    if w.dim() == 2 and tuple(w.shape) == (B, L):
        return w[:, None, :].expand(B, Q, L)
    if w.dim() == 3 and tuple(w.shape) == (B, Q, L):
        return w
    raise ValueError(f"layer_weights must be [L], [B, L] or [B, Q, L] with B = {B}, Q = {Q}, L = {L}, "
                     f"got shape {list(layer_weights.shape)}")


def query_fusion_attention_reference(q: torch.Tensor, k: KV, v: KV, layer_weights: torch.Tensor | None = None,
                                     attn_mask: torch.Tensor | None = None, scale: float | None = None, *,
                                     upcast: bool = True) -> torch.Tensor:
    """Per-layer masked softmax attention, then the layer-weighted sum.

    q: [B, H, Q, d]; k, v: [B, Hkv, L, N, d] or L x [B, Hkv, N, d], Hkv divides H;
    layer_weights: None (1/L), [L], [B, L] or [B, Q, L]; attn_mask: bool [B, Q or 1, L, N], True = may attend;
    scale: default d ** -0.5  ->  out [B, H, Q, d] in q's dtype.
    A query whose keys in a layer are all masked gets zero from that layer (and zero gradient through it).
    upcast=True computes in float32 (float64 stays float64); upcast=False keeps the matmuls in the input
    dtype, as an eager low-precision PyTorch model would (used to calibrate low-precision tolerances).
    """
    ks, vs = _layers(k), _layers(v)
    B, H, Q, d = q.shape
    L, Hkv = len(ks), ks[0].shape[1]
    scale = d ** -0.5 if scale is None else scale
    cdt = torch.promote_types(q.dtype, torch.float32) if upcast else q.dtype
    w = broadcast_layer_weights(layer_weights, B, Q, L, torch.promote_types(q.dtype, torch.float32), q.device)
    G = H // Hkv
    qg = q.to(cdt).reshape(B, Hkv, G * Q, d)  # the rows (head, query) of the heads sharing a key/value head
    out = torch.zeros(B, Hkv, G, Q, d, dtype=w.dtype, device=q.device)
    for layer in range(L):
        kl, vl = ks[layer].to(cdt), vs[layer].to(cdt)  # [B, Hkv, N, d]
        scores = (qg @ kl.transpose(-1, -2)).to(w.dtype).view(B, Hkv, G, Q, -1) * scale  # [B, Hkv, G, Q, N]
        if attn_mask is not None:
            allowed = attn_mask[:, None, None, :, layer, :]  # [B, 1, 1, Q or 1, N]
            scores = scores.masked_fill(~allowed, float("-inf"))
            any_key = allowed.any(-1, keepdim=True)
            probs = torch.softmax(scores.masked_fill(~any_key, 0.0), dim=-1) * any_key  # no NaN, zero rows
        else:
            probs = torch.softmax(scores, dim=-1)
        pv = probs.to(cdt).reshape(B, Hkv, G * Q, -1) @ vl  # [B, Hkv, G Q, d]
        out = out + w[:, None, None, :, layer, None] * pv.to(w.dtype).view(B, Hkv, G, Q, d)
    out = out.reshape(B, H, Q, d)
    return out.to(q.dtype)


# ---------------------------------------------------------------------------------------------------------
# Input validation (the public function runs it before any backend)
# ---------------------------------------------------------------------------------------------------------
def _check_float(t: object, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def _check_kv(t: KV, name: str, q: torch.Tensor) -> tuple[int, int, int]:
    """Validate keys or values against q; returns (Hkv, L, N)."""
    B, H, _, d = q.shape
    if isinstance(t, torch.Tensor):
        _check_float(t, name)
        if t.dim() != 5:
            raise ValueError(f"{name} must be [B, Hkv, L, N, d] (or a list of L [B, Hkv, N, d]), got {list(t.shape)}")
        layers = [t]
        Hkv, L, N = t.shape[1], t.shape[2], t.shape[3]
        shape = (B, Hkv, L, N, d)
    else:
        if not isinstance(t, (list, tuple)) or len(t) == 0:
            raise TypeError(f"{name} must be a tensor [B, Hkv, L, N, d] or a non-empty list of [B, Hkv, N, d]")
        for i, x in enumerate(t):
            _check_float(x, f"{name}[{i}]")
            if x.dim() != 4:
                raise ValueError(f"{name}[{i}] must be [B, Hkv, N, d], got shape {list(x.shape)}")
        layers, L = list(t), len(t)
        Hkv, N = t[0].shape[1], t[0].shape[2]
        shape = (B, Hkv, N, d)
    for i, x in enumerate(layers):
        where = name if isinstance(t, torch.Tensor) else f"{name}[{i}]"
        if tuple(x.shape) != shape:
            raise ValueError(f"{where} must have shape {list(shape)} (batch and head dim of q), got {list(x.shape)}")
        if x.dtype != q.dtype:
            raise TypeError(f"{where} has dtype {x.dtype} but q has {q.dtype}")
        if x.device != q.device:
            raise ValueError(f"{where} is on {x.device} but q is on {q.device}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"the key/value head count Hkv = {Hkv} of {name} must divide the query head count H = {H}")
    if L == 0:
        raise ValueError(f"{name} must hold at least one layer")
    return Hkv, L, N


def _check_mask(attn_mask: torch.Tensor | None, B: int, Q: int, L: int, N: int, device: torch.device) -> None:
    if attn_mask is None:
        return
    if not isinstance(attn_mask, torch.Tensor) or attn_mask.dtype != torch.bool:
        raise TypeError(f"attn_mask must be a bool tensor (True = may attend), got {getattr(attn_mask, 'dtype', None)}")
    if attn_mask.dim() != 4 or tuple(attn_mask.shape) not in ((B, Q, L, N), (B, 1, L, N)):
        raise ValueError(f"attn_mask must be [B, Q, L, N] or [B, 1, L, N] = [{B}, {Q} or 1, {L}, {N}], "
                         f"got shape {list(attn_mask.shape)}")
    if attn_mask.device != device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but q is on {device}")


def _check_inputs(q: torch.Tensor, k: KV, v: KV, layer_weights, attn_mask, scale) -> tuple[int, int, int]:
    """Validate every argument; returns (Hkv, L, N)."""
    _check_float(q, "q")
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, Q, d], got shape {list(q.shape)}")
    Hkv, L, N = _check_kv(k, "k", q)
    if _check_kv(v, "v", q) != (Hkv, L, N):
        raise ValueError("v must have the same heads, layers and tokens as k")
    if layer_weights is not None:
        if not isinstance(layer_weights, torch.Tensor) or not layer_weights.is_floating_point():
            raise TypeError("layer_weights must be a floating-point tensor or None")
        if layer_weights.device != q.device:
            raise ValueError(f"layer_weights is on {layer_weights.device} but q is on {q.device}")
        broadcast_layer_weights(layer_weights, q.shape[0], q.shape[2], L, device=q.device)  # shape check
    _check_mask(attn_mask, q.shape[0], q.shape[2], L, N, q.device)
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python number or None, got {type(scale).__name__}")
    return Hkv, L, N


def _kernel_layers(t: KV) -> list[torch.Tensor]:
    """The op's Tensor[] argument: [stacked 5-D tensor] or L layers sharing strides, unit stride in d."""
    if isinstance(t, torch.Tensor):
        return [t if t.stride(-1) == 1 else t.contiguous()]
    layers = list(t)
    if any(x.stride() != layers[0].stride() or x.stride(-1) != 1 for x in layers):
        layers = [x.contiguous() for x in layers]
    return layers


# ---------------------------------------------------------------------------------------------------------
# Triton ops (torch.library custom ops around amfor.kernels.query_fusion)
# ---------------------------------------------------------------------------------------------------------
def _unstack(k: list[torch.Tensor]) -> list[torch.Tensor]:
    """Op argument ([B, Hkv, L, N, d] or L x [B, Hkv, N, d]) -> L layer views [B, Hkv, N, d]."""
    return list(k[0].unbind(2)) if len(k) == 1 and k[0].dim() == 5 else list(k)


@torch.library.custom_op("amfor::query_fusion_attention_triton", mutates_args=())
def _qf_triton(q: torch.Tensor, k: list[torch.Tensor], v: list[torch.Tensor], weights: torch.Tensor,
               attn_mask: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    from amfor.kernels import query_fusion as kernels

    return kernels.forward(q, _unstack(k), _unstack(v), weights, attn_mask, scale)


@torch.library.custom_op("amfor::query_fusion_attention_backward_triton", mutates_args=())
def _qf_backward_triton(grad_out: torch.Tensor, q: torch.Tensor, k: list[torch.Tensor], v: list[torch.Tensor],
                        weights: torch.Tensor, attn_mask: torch.Tensor | None, scale: float,
                        lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from amfor.kernels import query_fusion as kernels

    dq, dk, dv, t = kernels.backward(grad_out, q, _unstack(k), _unstack(v), weights, attn_mask, scale, lse)
    return dq, dk, dv, t.sum(1)


# ---------------------------------------------------------------------------------------------------------
# Fake implementations and autograd, shared by the Triton ops and the C++/CUDA ops of amfor._C
# ---------------------------------------------------------------------------------------------------------
def _kv_dims(k: list[torch.Tensor]) -> tuple[int, int, int]:
    """(Hkv, L, N) of the op's Tensor[] argument."""
    if len(k) == 1 and k[0].dim() == 5:
        return k[0].shape[1], k[0].shape[2], k[0].shape[3]
    return k[0].shape[1], len(k), k[0].shape[2]


def _fake_forward(q, k, v, weights, attn_mask, scale):
    B, H, Q, _ = q.shape
    L = _kv_dims(k)[1]
    return torch.empty_like(q), q.new_empty((B, H, Q, L), dtype=weights.dtype)


def _fake_backward(grad_out, q, k, v, weights, attn_mask, scale, lse):
    B, _, Q, d = q.shape
    Hkv, L, N = _kv_dims(k)
    dk = k[0].new_empty((B, Hkv, L, N, d))
    return torch.empty_like(q), dk, torch.empty_like(dk), weights.new_empty((B, Q, L))


def _setup(ctx, inputs, output):
    q, k, v, weights, attn_mask, scale = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.scale, ctx.num_k = scale, len(k)
    ctx.k_stacked, ctx.v_stacked = (len(t) == 1 and t[0].dim() == 5 for t in (k, v))  # each in the form it came
    ctx.has_mask = attn_mask is not None
    extra = [attn_mask] if attn_mask is not None else []
    ctx.save_for_backward(q, weights, output[1], *extra, *k, *v)


def _backward(ops: dict):
    backward_op = ops["query_fusion_attention_backward"]

    def backward(ctx, grad_out, grad_lse):
        q, weights, lse, *rest = ctx.saved_tensors
        mask = rest.pop(0) if ctx.has_mask else None
        k, v = rest[:ctx.num_k], rest[ctx.num_k:]
        dq, dk, dv, dw = backward_op(grad_out.contiguous(), q, k, v, weights, mask, ctx.scale, lse)
        dks = [dk] if ctx.k_stacked else list(dk.unbind(2))
        dvs = [dv] if ctx.v_stacked else list(dv.unbind(2))
        return dq, dks, dvs, dw, None, None

    return backward


SPECS = (
    _registry.OpSpec("query_fusion_attention", _fake_forward, _setup, _backward),
    _registry.OpSpec("query_fusion_attention_backward", _fake_backward),
)
_TRITON = _registry.register_implementation(SPECS, "_triton")["query_fusion_attention"]
_COMPILED = (_registry.register_implementation(SPECS, "") or {}).get("query_fusion_attention")


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------
def _autocast_inputs(q: torch.Tensor, k: KV, v: KV) -> tuple[torch.Tensor, KV, KV]:
    """Under autocast for q's device: q, k, v cast to the autocast dtype (float64 and non-tensors untouched, so
    validation still names them); otherwise unchanged. Autocast only acts on torch's own ops, and q (from a
    linear layer) would otherwise arrive in bfloat16 next to float32 keys (from a LayerNorm)."""
    if not isinstance(q, torch.Tensor) or not torch.is_autocast_enabled(q.device.type):
        return q, k, v
    dtype = torch.get_autocast_dtype(q.device.type)

    def cast(t):
        if isinstance(t, torch.Tensor):
            return t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t
        return [cast(x) for x in t] if isinstance(t, (list, tuple)) else t

    return cast(q), cast(k), cast(v)


def query_fusion_attention(q: torch.Tensor, k: KV, v: KV, layer_weights: torch.Tensor | None = None,
                           attn_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """A few queries attend over the tokens of L layers; the per-layer results are mixed by layer weights.

    q: [B, H, Q, d]; k, v: [B, Hkv, L, N, d] or a list of L tensors [B, Hkv, N, d] (Hkv divides H; Hkv = 1
    shares keys/values across heads); layer_weights: None (1/L each), [L], [B, L] or [B, Q, L],
    differentiable; attn_mask: None or bool [B, Q, L, N] / [B, 1, L, N], True = may attend (a layer whose
    keys are all masked for a query contributes zero); scale: default d ** -0.5  ->  out [B, H, Q, d].
    float32/float16/bfloat16 (float64 on the torch, cpp and cuda backends), float32 accumulation. Under
    autocast, q, k and v run in the autocast dtype (as SDPA does), whatever mix of float dtypes they came in.
    """
    q, k, v = _autocast_inputs(q, k, v)
    Hkv, L, N = _check_inputs(q, k, v, layer_weights, attn_mask, scale)
    B, H, Q, d = q.shape
    scale = float(d ** -0.5 if scale is None else scale)
    backend = DISPATCH.backend(q.device, q.dtype)
    if backend == "torch":
        return query_fusion_attention_reference(q, k, v, layer_weights, attn_mask, scale)
    if d > MAX_HEAD_DIM:
        raise ValueError(f"the {backend} kernels support head dims up to {MAX_HEAD_DIM}, got d = {d}")
    if backend == "cuda" and L > MAX_LAYERS:
        raise ValueError(f"the cuda backend takes at most {MAX_LAYERS} separate layer tensors, got {L}")
    weights = broadcast_layer_weights(layer_weights, B, Q, L, torch.promote_types(q.dtype, torch.float32), q.device)
    mask = attn_mask.contiguous() if attn_mask is not None else None
    op = _TRITON if backend == "triton" else _COMPILED
    out, _ = op(q.contiguous(), _kernel_layers(k), _kernel_layers(v), weights.contiguous(), mask, scale)
    return out
