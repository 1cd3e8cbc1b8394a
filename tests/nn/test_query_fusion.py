"""QueryFusion: the absorbed and projected paths agree, match nn.MultiheadAttention, and the cost model."""

import pytest
import torch

from amfor.nn import QueryFusion
from amfor.nn.query_fusion import choose_path, query_fusion_costs
from amfor.ops import use_backend
from amfor.testing import backends

KERNELS = [b for b in backends("cpu") if b in ("cpp", "triton")]


def _module(dim=48, heads=4, queries=5, layers=3, **kw) -> QueryFusion:
    torch.manual_seed(0)
    module = QueryFusion(dim, heads, queries, layers, **kw).double()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # non-trivial biases and layer logits
    return module


def _grads(module, out, inputs):
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.autograd.grad(out, params + inputs, torch.ones_like(out) / out.numel() ** 0.5, allow_unused=True)


@pytest.mark.parametrize("as_list", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_absorbed_equals_projected(as_list, masked, bias):
    module = _module(bias=bias)
    B, L, N, D = 3, 3, 11, 48
    x = torch.randn(B, L, N, D, dtype=torch.float64, requires_grad=True)
    mask = None
    if masked:
        mask = torch.rand(B, 5, L, N) > 0.5
        mask[0, 1, 2] = False  # a fully masked (query, layer): zero contribution, value bias included
    xs = list(x.unbind(1)) if as_list else x
    outs = {p: module(xs, attn_mask=mask, path=p) for p in ("absorbed", "projected")}
    torch.testing.assert_close(outs["absorbed"], outs["projected"], rtol=1e-10, atol=1e-10)
    ga, gp = (_grads(module, outs[p], [x]) for p in ("absorbed", "projected"))
    for a, b in zip(ga, gp, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_per_sample_queries_and_layer_weights():
    module = _module(queries=0, layer_weights="input")
    B, L, N, D = 2, 3, 9, 48
    x = torch.randn(B, L, N, D, dtype=torch.float64)
    queries = torch.randn(B, 4, D, dtype=torch.float64)
    for w in (torch.rand(L, dtype=torch.float64), torch.rand(B, L, dtype=torch.float64),
              torch.rand(B, 4, L, dtype=torch.float64)):
        a = module(x, queries, w, path="absorbed")
        p = module(x, queries, w, path="projected")
        torch.testing.assert_close(a, p, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="forward needs layer_weights"):
        module(x, queries)
    with pytest.raises(ValueError, match="no learnable queries"):
        module(x, layer_weights=torch.rand(L, dtype=torch.float64))


def test_one_layer_is_multihead_attention():
    """L = 1, projected or absorbed: nn.MultiheadAttention with the same weights (the part decoder's layer)."""
    module = _module(layers=1, layer_weights="uniform")
    mha = torch.nn.MultiheadAttention(48, 4, batch_first=True).double()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([module.q_proj.weight, module.k_proj.weight, module.v_proj.weight]))
        key_bias = torch.randn_like(module.v_proj.bias)  # any key bias: the softmax cancels it
        mha.in_proj_bias.copy_(torch.cat([module.q_proj.bias, key_bias, module.v_proj.bias]))
        mha.out_proj.weight.copy_(module.proj.weight)
        mha.out_proj.bias.copy_(module.proj.bias)
    x = torch.randn(2, 13, 48, dtype=torch.float64)
    keep = torch.rand(2, 5, 13) > 0.3
    keep[:, :, 0] = True  # nn.MultiheadAttention gives NaN for fully masked rows; keep one key
    q = module.query[None].expand(2, -1, -1)
    expect = mha(q, x, x, attn_mask=~keep.repeat_interleave(4, 0), need_weights=False)[0]
    for path in ("absorbed", "projected"):
        out = module(x, attn_mask=keep[:, :, None], path=path)
        torch.testing.assert_close(out, expect, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", KERNELS)
def test_kernels_run_the_module(backend):
    module = _module().float()
    x = [torch.randn(2, 17, 48) for _ in range(3)]
    mask = torch.rand(2, 1, 3, 17) > 0.3
    for path in ("absorbed", "projected"):
        expect = module(x, attn_mask=mask, path=path)
        with use_backend(backend):
            out = module(x, attn_mask=mask, path=path)
        torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-5)


def test_cost_model():
    # ViT-B, 16 queries over 6 layers of 242 tokens: absorbing the projections is ~4x fewer MACs
    cost = query_fusion_costs(64, 16, 6, 242, 768, 12)
    assert cost["projected"] > 3 * cost["absorbed"]
    assert choose_path(64, 16, 6, 242, 768, 12) == "absorbed"
    assert choose_path(64, 10, 1, 242, 768, 8, per_sample_queries=True) == "absorbed"  # the part decoder
    assert choose_path(64, 128, 6, 242, 768, 12) == "projected"  # many queries: project the tokens once
    assert _module(path="projected").choose_path(64, 16, 242, False) == "projected"
    assert QueryFusion(768, 12, 16, 6).choose_path(64, 16, 242, False) == "absorbed"


def test_learned_layer_weights_train():
    module = _module()
    out = module(torch.randn(2, 3, 7, 48, dtype=torch.float64))
    out.square().sum().backward()
    assert module.layer_logits.grad is not None and module.layer_logits.grad.abs().sum() > 0


def test_bad_configuration_and_input():
    with pytest.raises(ValueError, match="divisible"):
        QueryFusion(50, 4, 5, 2)
    with pytest.raises(ValueError, match="path"):
        QueryFusion(48, 4, 5, 2, path="fast")
    with pytest.raises(ValueError, match="x must be"):
        QueryFusion(48, 4, 5, 2)(torch.randn(2, 3, 7, 48))
    with pytest.raises(ValueError, match="x must be a list"):
        QueryFusion(48, 4, 5, 2)([torch.randn(2, 7, 48)])
