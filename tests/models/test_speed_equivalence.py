"""The training step's restructurings for speed (issue 28, docs/model.md "Training-step cost") compute what the old
code computed: every loss term and every parameter's gradient, on the same batch, weights and random draws.

The old code is kept here, one function per restructured place (OLD_CODE), and patched in for the reference run.
"""

from __future__ import annotations

import copy

import pytest
import torch

from amfor.losses.amgd import GenerationBlock
from amfor.models.attention import single_layer_attention
from amfor.models.fusion import FusionPoint
from amfor.models.parts import PartDecoder, PartDecoderLayer
from amfor.nn import QueryFusion

# -- the old code -----------------------------------------------------------------------------------------------


def old_cross_attention(self, memory, q, attn_mask):
    """Before: the part decoder's cross-attention through the query-fusion op (QueryFusion, one layer)."""
    return self.cross_attn(memory, q, attn_mask=attn_mask)


def old_fusion_forward(self, layers, text_bank=None):
    """Before: the weighted sum of the layers, then the gate's blend with the last layer."""
    if len(layers) != self.num_layers:
        raise ValueError(f"fusion point expects {self.num_layers} layers, got {len(layers)}")
    w = self.layer_weights(layers, self.text_queries(text_bank))
    mixed = sum(w[:, i, None, :] * x for i, x in enumerate(layers))
    g = torch.sigmoid(self.gate)
    return g * mixed + (1.0 - g) * layers[-1]


def old_text_queries(self, text_bank):
    """Before: the AMFF text step through the query-fusion op (QueryFusion, one layer, batch 1)."""
    if self.text_attn is None or text_bank is None:
        return self.queries
    return self.queries + self.text_attn(text_bank[None], self.queries)[0]


def old_part_decoder_forward(self, memory, teacher_mask=None):
    """Before: the student's and the teacher's queries stacked from the start, the first layer's self-attention run
    on both (the same inputs, so the same result)."""
    B = memory.shape[0]
    q = torch.cat([memory[:, :1].detach(), self.query_embed.expand(B, -1, -1)], dim=1)
    passes, mask = 1, None
    if teacher_mask is not None:
        passes = 2
        q = torch.cat([q, q], dim=1)
        mask = torch.cat([torch.ones_like(teacher_mask), teacher_mask], dim=1)[:, :, None]
    tokens = self.memory_norm(memory[:, 1:])
    for layer in self.layers:
        q = layer(q, tokens, passes, mask)
    if teacher_mask is None:
        return q, None
    return q[:, : self.num_queries], q[:, self.num_queries:]


def old_generation_forward(self, x):
    """Before: AMGD's generation block as two 1-d convolutions over the granularity axis."""
    return self.conv2(torch.relu(self.conv1(x.transpose(1, 2)))).transpose(1, 2)


OLD_CODE = {  # restructuring -> [(owner, attribute, the old function)]
    "AMGD generation block as GEMMs": [(GenerationBlock, "forward", old_generation_forward)],
    "part decoder's shared first self-attention": [(PartDecoder, "forward", old_part_decoder_forward)],
    "part decoder cross-attention": [(PartDecoderLayer, "cross_attention", old_cross_attention)],
    "fusion point's gated mix": [(FusionPoint, "forward", old_fusion_forward)],
    "AMFF text step": [(FusionPoint, "text_queries", old_text_queries)],
}


def use_old_code(monkeypatch) -> None:
    for patches in OLD_CODE.values():
        for owner, name, fn in patches:
            monkeypatch.setattr(owner, name, fn)


# -- helpers ----------------------------------------------------------------------------------------------------


def train_step(model, batch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(every loss term, every parameter's gradient) of one training forward + backward, random draws seeded."""
    torch.manual_seed(1)
    out = model(batch["img"], batch["pid"], batch["camid"], batch["mask"], batch["occlusion"])
    model.zero_grad(set_to_none=True)
    out["loss"].backward()
    losses = {k: v.detach() for k, v in out.items() if k.startswith("loss")}
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return losses, grads


def assert_same(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor], what: str) -> None:
    """Equal within float32's op tolerance: 1e-5 relative to each element, or to the tensor's largest element
    (a gradient summed over many paths in another order differs by rounding relative to its scale), at least 1e-6
    (float32 rounding of the total loss, about 30, reaches there through gradients that cancel, e.g. a softmax's)."""
    assert new.keys() == old.keys(), f"{what}: {sorted(new.keys() ^ old.keys())} only on one side"
    for k, ref in old.items():
        scale = ref.abs().max().item() if ref.is_floating_point() and ref.numel() else 0.0
        torch.testing.assert_close(new[k], ref, rtol=1e-5, atol=1e-5 * scale + 1e-6,
                                   msg=lambda m, k=k: f"{what} {k}: {m}")


# -- tests ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("camera_centering", [False, True])
def test_the_training_step_computes_what_the_old_code_did(camera_centering, small, monkeypatch):
    """Every component on: the losses dict term by term and every gradient, new code against the old."""
    model = small.model(camera_centering=camera_centering).train()
    old_model = copy.deepcopy(model)  # the same weights and running statistics before either step
    batch = small.batch(small.config["img_size"], batch=8)
    new_losses, new_grads = train_step(model, batch)
    with monkeypatch.context() as m:
        use_old_code(m)
        old_losses, old_grads = train_step(old_model, batch)
    assert len(new_losses) > 10 and new_grads.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    assert_same(new_losses, old_losses, "loss")
    assert_same(new_grads, old_grads, "gradient")
    assert_same(dict(model.named_buffers()), dict(old_model.named_buffers()), "buffer")


def test_eval_features_are_what_the_old_code_gave(small, monkeypatch):
    model = small.model(camera_centering=True).eval()
    batch = small.batch(small.config["img_size"], batch=6)
    with torch.no_grad():
        new = model(batch["img"], batch["camid"])
        with monkeypatch.context() as m:
            use_old_code(m)
            old = model(batch["img"], batch["camid"])
    assert_same(new, old, "eval")


def test_the_part_decoder_cross_attention_is_the_query_fusion_layer_it_replaced():
    """Masked rows (the teacher's queries) and unmasked ones, outputs and the gradients of every input."""
    torch.manual_seed(0)
    layer = PartDecoderLayer(32, 4, 64)
    memory = torch.randn(3, 7, 32, requires_grad=True)
    q = torch.randn(3, 10, 32, requires_grad=True)
    mask = torch.rand(3, 10, 1, 7) > 0.6
    mask[:, :5] = True  # the student's rows see every token
    mask[..., 2] = True  # every row keeps a token (as the teacher masks do)
    results = []
    for fn in (PartDecoderLayer.cross_attention, old_cross_attention):
        out = fn(layer, memory, q, mask)
        grads = torch.autograd.grad(out.square().mean(), [memory, q, *layer.cross_attn.parameters()])
        results.append({"out": out, **{f"grad {i}": g for i, g in enumerate(grads)}})
    assert_same(*results, "cross-attention")


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("teacher", [False, True])
def test_the_part_decoder_shares_its_first_self_attention_as_the_old_one_computed_it_twice(depth, teacher):
    """Student and teacher from one first-layer self-attention: both outputs and every gradient, one and two layers
    (the second layer's passes differ and run apart), with and without the teacher."""
    torch.manual_seed(0)
    decoder = PartDecoder(32, 3, 4, 64, depth)
    memory = torch.randn(2, 1 + 6, 32, requires_grad=True)
    mask = (torch.rand(2, 5, 6) > 0.5) | torch.eye(5, 6, dtype=torch.bool) if teacher else None
    results = []
    for fn in (PartDecoder.forward, old_part_decoder_forward):
        student, teacher_out = fn(decoder, memory, mask)
        outs = [student] if teacher_out is None else [student, teacher_out]
        loss = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs)  # the passes weighed apart
        grads = torch.autograd.grad(loss, [memory, *decoder.parameters()])
        results.append({**{f"out {i}": o for i, o in enumerate(outs)}, **{f"grad {i}": g for i, g in enumerate(grads)}})
    assert_same(*results, "part decoder")


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_the_generation_block_is_the_convolutions_it_replaced(kernel_size):
    """Every kernel size the block takes (G = 10 granularities, wider than the kernel and the padding): the output and
    the gradients of the input and the weights."""
    torch.manual_seed(0)
    block = GenerationBlock(16, 12, 20, kernel_size)
    x = torch.randn(4, 10, 16, requires_grad=True)
    results = []
    for fn in (GenerationBlock.forward, old_generation_forward):
        out = fn(block, x)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(),
                                    [x, *block.parameters()])
        results.append({"out": out, **{f"grad {i}": g for i, g in enumerate(grads)}})
    assert_same(*results, "generation block")


@pytest.mark.parametrize("weighting", ["softmax", "sigmoid"])
def test_the_fusion_points_gated_mix_is_the_old_one(weighting):
    """Both weightings, a gate away from its start: the output and the gradients of the layers and every weight."""
    torch.manual_seed(0)
    point = FusionPoint(32, 3, 4, weighting=weighting, text=True)
    with torch.no_grad():
        point.gate.fill_(0.3)
    layers = [torch.randn(2, 5, 32, requires_grad=True) for _ in range(3)]
    bank = torch.randn(6, 32)
    results = []
    for fn in (FusionPoint.forward, old_fusion_forward):
        out = fn(point, layers, bank)
        grads = torch.autograd.grad(out.square().mean(), [*layers, *point.parameters()])  # a loss of about 1
        results.append({"out": out, **{f"grad {i}": g for i, g in enumerate(grads)}})
    assert_same(*results, "fusion point")


def test_the_amff_text_step_is_the_query_fusion_call_it_replaced():
    torch.manual_seed(0)
    point = FusionPoint(32, 4, 4, text=True)
    bank = torch.randn(9, 32)
    results = []
    for fn in (FusionPoint.text_queries, old_text_queries):
        out = fn(point, bank)
        grads = torch.autograd.grad(out.square().mean(), [point.queries, *point.text_attn.parameters()])
        results.append({"out": out, **{f"grad {i}": g for i, g in enumerate(grads)}})
    assert_same(*results, "text step")


def test_single_layer_attention_takes_only_a_one_layer_uniform_query_fusion():
    with pytest.raises(ValueError, match="one-layer QueryFusion with uniform weights"):
        single_layer_attention(QueryFusion(8, 2, 0, 2), torch.randn(1, 3, 8), torch.randn(1, 2, 8))
