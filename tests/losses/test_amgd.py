"""AMGDLoss: shapes, a hand-checked case, gradient flow (student only by default), learned weights."""

import math

import pytest
import torch
from torch import nn

from amfor.losses import AMGDLoss
from amfor.ops import use_backend
from amfor.testing import backends

B, G, D, C = 4, 5, 16, 11


def _inputs(seed=0, teacher_dim=D):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, G, D, generator=g, requires_grad=True)
    teacher = torch.randn(B, G, teacher_dim, generator=g, requires_grad=True)
    s_logits = torch.randn(G, B, C, generator=g, requires_grad=True)
    t_logits = torch.randn(G, B, C, generator=g, requires_grad=True)
    return student, teacher, s_logits, t_logits


def _identity_generation(loss: AMGDLoss) -> None:
    """Make the mask keep everything and the generation block the identity (kernel size 1, inputs >= 0)."""
    with torch.no_grad():
        loss.mask.head.weight.zero_()
        loss.mask.head.bias.fill_(20.0)  # keep probability ~1 > lambda everywhere
        for conv in (loss.generate.conv1, loss.generate.conv2):
            conv.weight.copy_(torch.eye(conv.weight.shape[0], conv.weight.shape[1])[:, :, None])
            conv.bias.zero_()


def test_shapes_and_fields():
    amgd = AMGDLoss(D, G, num_heads=4)
    out = amgd(*_inputs())
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert out.feature_weights.shape == (G,) and out.logit_weights.shape == (G,)
    torch.testing.assert_close(out.feature_weights, torch.ones(G))  # uniform at initialisation, mean 1
    assert 0.0 < out.keep_ratio.item() < 1.0, "the learned mask starts by keeping about half the channels"


def test_hand_checked_case():
    """Mask keeps all, identity generation: feature = sum of per-granularity MSEs; logit = sum of row KLs."""
    amgd = AMGDLoss(2, 2, num_heads=1, gen_kernel_size=1)
    _identity_generation(amgd)
    student = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # [B=1, G=2, D=2]
    teacher = torch.ones(1, 2, 2)
    s_logits = torch.zeros(2, 1, 2)
    t_logits = torch.tensor([[[math.log(3.0), 0.0]], [[math.log(3.0), 0.0]]])  # p_t = (3/4, 1/4)
    out = amgd(student, teacher, s_logits, t_logits)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    torch.testing.assert_close(out.feature, torch.tensor(0.5 + 6.5))  # MSE (0 + 1) / 2 and (4 + 9) / 2
    torch.testing.assert_close(out.logit, torch.tensor(2 * kl))
    torch.testing.assert_close(out.loss, torch.tensor(7.0 + 2 * kl))  # the weight regulariser is 0 at uniform
    assert out.keep_ratio.item() == 1.0


def test_dict_inputs_match_stacked_tensors():
    amgd = AMGDLoss(D, G, num_heads=4)
    student, teacher, s_logits, t_logits = _inputs()
    as_dict = lambda x: {"global": x[:, 0], "parts": x[:, 1:4], "foreground": x[:, 4]}  # noqa: E731
    logits_dict = lambda x: {"global": x[0], "parts": x[1:4].transpose(0, 1), "foreground": x[4]}  # noqa: E731
    a = amgd(student, teacher, s_logits, t_logits)
    b = amgd(as_dict(student), as_dict(teacher), logits_dict(s_logits), logits_dict(t_logits))
    torch.testing.assert_close(a.loss, b.loss)


def test_backpropagates_to_the_student_only_by_default():
    amgd = AMGDLoss(D, G, num_heads=4, teacher_dim=24)
    student, teacher, s_logits, t_logits = _inputs(teacher_dim=24)
    amgd(student, teacher, s_logits, t_logits).loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert s_logits.grad is not None and s_logits.grad.abs().sum() > 0
    assert teacher.grad is None and t_logits.grad is None
    for name, p in amgd.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
    assert amgd.mask.head.weight.grad.abs().sum() > 0, "the straight-through estimator reaches the mask"


def test_self_distillation_reaches_teacher_logits_not_teacher_features():
    amgd = AMGDLoss(D, G, num_heads=4, detach_teacher=False)
    student, teacher, s_logits, t_logits = _inputs()
    amgd(student, teacher, s_logits, t_logits).loss.backward()
    assert t_logits.grad is not None and t_logits.grad.abs().sum() > 0
    assert teacher.grad is None


def test_granularity_weights_are_learned():
    """One granularity far harder than the others: gradient steps move weight away from it (towards the rest)."""
    torch.manual_seed(0)
    amgd = AMGDLoss(D, G, num_heads=4)
    student, teacher, s_logits, t_logits = _inputs()
    teacher = teacher.detach().clone()
    teacher[:, 0] += 10.0  # granularity 0: a large feature distance
    t_logits = t_logits.detach().clone()
    t_logits[2] *= 8.0  # granularity 2: a large KL
    opt = torch.optim.SGD([amgd.feature_logits, amgd.logit_logits], lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        out = amgd(student.detach(), teacher, s_logits.detach(), t_logits)
        out.loss.backward()
        opt.step()
    w_feat, w_logit = amgd.granularity_weights()
    assert w_feat[0] < 1.0 and w_logit[2] < 1.0
    assert w_feat.sum().item() == pytest.approx(G) and w_logit.sum().item() == pytest.approx(G)


def test_features_only_and_bad_inputs():
    amgd = AMGDLoss(D, G, num_heads=4)
    student, teacher, s_logits, _ = _inputs()
    out = amgd(student, teacher)
    assert out.logit.item() == 0.0 and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="both student_logits and teacher_logits"):
        amgd(student, teacher, s_logits)
    with pytest.raises(ValueError, match="G = 5"):
        amgd(student[:, :3], teacher[:, :3])
    with pytest.raises(ValueError, match="student_feats must be"):
        amgd(student[0], teacher)
    with pytest.raises(ValueError, match=r"logits must be \[G, B, C\]"):
        amgd(student, teacher, s_logits[:2], s_logits[:2])
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        AMGDLoss(D, G, num_heads=4, gen_kernel_size=2)


@pytest.mark.parametrize("backend", backends("cpu"))
def test_same_loss_on_every_backend(backend):
    amgd = AMGDLoss(D, G, num_heads=4)
    inputs = _inputs()
    with use_backend("torch"):
        want = amgd(*inputs).loss
    with use_backend(backend):
        got = amgd(*inputs).loss
    torch.testing.assert_close(got, want)


def test_trains_with_an_optimizer_step():
    """A full step through a tiny student: the loss goes down over a few steps."""
    torch.manual_seed(1)
    student_net = nn.Linear(8, G * D)
    classifier = nn.Linear(D, C)
    amgd = AMGDLoss(D, G, num_heads=4, gen_kernel_size=1)
    x = torch.randn(B, 8)
    teacher = torch.randn(B, G, D)
    t_logits = torch.randn(G, B, C)
    opt = torch.optim.Adam([*student_net.parameters(), *classifier.parameters(), *amgd.parameters()], lr=1e-2)
    losses = []
    for _ in range(30):
        feats = student_net(x).reshape(B, G, D)
        out = amgd(feats, teacher, classifier(feats).transpose(0, 1), t_logits)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0]
