"""benchmarks/op_calls.py: the op calls of a real model step are all captured, the model's ops are restored, and
the replay runs the same computation on every backend."""

from __future__ import annotations

import importlib

import pytest
import torch

import amfor
from amfor.ops import available_backends
from benchmarks.op_calls import OPS, SITES, capture_op_calls, output_grads, replay

B, IDS, CAMERAS, CLASSES = 8, 2, 3, 10


def _full_model_losses() -> dict[str, torch.Tensor]:
    """The loss dict of one training forward of the tiny full model on a small random batch."""
    torch.manual_seed(0)
    model = amfor.create_model("amfor_vit_tiny_patch16", CLASSES, CAMERAS)
    model.finish_stage1()
    model.train()
    H, W = model.input_size
    occlusion = torch.zeros(B, H, W, dtype=torch.bool)
    occlusion[:2, H // 2:] = True
    return model(torch.randn(B, 3, H, W), torch.arange(IDS).repeat_interleave(B // IDS),
                 torch.randint(0, CAMERAS, (B,)), torch.randint(0, 9, (B, H, W)), occlusion)


@pytest.fixture(scope="module")
def calls():
    with capture_op_calls() as captured:
        _full_model_losses()["loss"].backward()
    return captured


def _originals() -> dict[tuple[str, str], object]:
    return {(m, op): getattr(importlib.import_module(m), op) for m, ops in SITES.items() for op in ops}


def test_the_full_step_calls_every_op_and_each_call_keeps_its_inputs(calls):
    assert {c.op for c in calls} == set(OPS)
    qf = [c for c in calls if c.op == "query_fusion_attention"]
    assert all(c.args[0].requires_grad for c in qf)  # the queries are learned: their copies still require grad
    assert all(c.grad_enabled and c.autocast is None and c.device == "cpu" for c in calls)


def test_capture_restores_the_models_ops_even_when_the_block_raises():
    before = _originals()
    with pytest.raises(RuntimeError, match="inside"), capture_op_calls():
        assert _originals() != before  # wrapped inside the block
        raise RuntimeError("inside")
    assert _originals() == before


def test_replay_gives_every_input_that_requires_grad_a_gradient(calls):
    grads = output_grads(calls)
    for call, grad, (out, dx) in zip(calls, grads, replay(calls, grads, "torch")(), strict=True):
        assert torch.isfinite(out).all()
        assert (grad is None) == (not out.requires_grad)
        flat = [t for a in (*call.args, *call.kwargs.values()) for t in (a if isinstance(a, (list, tuple)) else [a])]
        needing = [t for t in flat if isinstance(t, torch.Tensor) and t.requires_grad]  # k, v may be lists
        assert len(dx) == (len(needing) if grad is not None else 0)
        assert any(g is not None for g in dx) or not dx


@pytest.mark.skipif("cpp" not in available_backends("cpu"), reason="amfor._C is not built")
def test_replay_on_cpp_matches_the_torch_reference(calls):
    grads = output_grads(calls)
    for (out, dx), (ref, ref_dx) in zip(replay(calls, grads, "cpp")(), replay(calls, grads, "torch")(), strict=True):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        for a, b in zip(dx, ref_dx, strict=True):
            if b is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
