"""Camera centring: running per-camera means, what training and eval subtract, errors, and the model wiring."""

from __future__ import annotations

import pytest
import torch

from amfor.models.camera import CameraCentering


def test_first_batch_sets_the_means_then_they_move_by_the_momentum():
    cc = CameraCentering(num_cameras=3, num_slots=2, dim=4, momentum=0.25).train()
    x = torch.randn(6, 2, 4)
    cams = torch.tensor([0, 0, 1, 1, 1, 0])
    out = cc(x, cams)
    m0, m1 = x[cams == 0].mean(0), x[cams == 1].mean(0)
    torch.testing.assert_close(cc.running_mean[0], m0)
    torch.testing.assert_close(cc.running_mean[1], m1)
    assert cc.seen.tolist() == [True, True, False] and cc.running_mean[2].abs().sum() == 0
    torch.testing.assert_close(out[cams == 0], x[cams == 0] - m0)  # training subtracts the just-updated means
    y = torch.randn(2, 2, 4)
    cc(y, torch.tensor([1, 2]))
    torch.testing.assert_close(cc.running_mean[1], m1 + 0.25 * (y[0] - m1))
    torch.testing.assert_close(cc.running_mean[2], y[1])  # a camera's first batch sets its mean
    torch.testing.assert_close(cc.running_mean[0], m0)  # absent from the batch: unchanged


def test_eval_subtracts_the_running_means_and_never_updates():
    cc = CameraCentering(2, 1, 3).train()
    cc(torch.randn(4, 1, 3), torch.tensor([0, 0, 1, 1]))
    means = cc.running_mean.clone()
    cc.eval()
    x = torch.randn(3, 1, 3)
    out = cc(x, torch.tensor([1, 0, 1]))
    torch.testing.assert_close(out, x - means[[1, 0, 1]])
    assert torch.equal(cc.running_mean, means)


def test_update_false_and_slots_read_without_moving():
    cc = CameraCentering(2, 3, 2).train()
    cc(torch.randn(2, 3, 2), torch.tensor([0, 1]))
    means = cc.running_mean.clone()
    x = torch.randn(2, 3, 2)
    torch.testing.assert_close(cc(x, torch.tensor([1, 0]), update=False), x - means[[1, 0]])
    g = torch.randn(2, 1, 2)
    torch.testing.assert_close(cc(g, torch.tensor([0, 1]), slots=slice(0, 1)), g - means[[0, 1], :1])
    assert torch.equal(cc.running_mean, means)


def test_gradients_do_not_flow_into_the_means():
    cc = CameraCentering(2, 1, 3).train()
    x = torch.randn(4, 1, 3, requires_grad=True)
    cc(x, torch.tensor([0, 0, 1, 1])).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))  # the detached means are constants


def test_errors():
    with pytest.raises(ValueError, match="num_cameras"):
        CameraCentering(0, 1, 4)
    with pytest.raises(ValueError, match="momentum"):
        CameraCentering(2, 1, 4, momentum=0.0)
    cc = CameraCentering(2, 2, 4)
    with pytest.raises(ValueError, match=r"\[B, 2, 4\]"):
        cc(torch.randn(3, 1, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="camids"):
        cc(torch.randn(3, 2, 4), torch.zeros(3))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        cc(torch.randn(3, 2, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        cc(torch.randn(3, 2, 4), torch.tensor([0, 1, -2]))


def test_an_unknown_or_unseen_camera_gets_the_seen_cameras_mean_and_moves_nothing():
    """camid -1 (or camids=None) and a camera training never saw are centred with the mean of the seen cameras'
    means; an unknown camera in a training batch leaves the means alone."""
    cc = CameraCentering(4, 2, 3).train()
    x = torch.randn(5, 2, 3)
    cc(x, torch.tensor([0, 0, 2, -1, 2]))
    assert cc.seen.tolist() == [True, False, True, False]
    torch.testing.assert_close(cc.running_mean[0], x[:2].mean(0))
    torch.testing.assert_close(cc.running_mean[2], x[[2, 4]].mean(0))  # the unknown row moved nothing
    pooled = (cc.running_mean[0] + cc.running_mean[2]) / 2
    cc.eval()
    y = torch.randn(4, 2, 3)
    out = cc(y, torch.tensor([-1, 1, 3, 2]))
    torch.testing.assert_close(out[:3], y[:3] - pooled)
    torch.testing.assert_close(out[3], y[3] - cc.running_mean[2])
    torch.testing.assert_close(cc(y, None), y - pooled)
    torch.testing.assert_close(cc(y[:, :1], None, slots=slice(0, 1)), y[:, :1] - pooled[:1])


def test_the_model_centres_its_eval_features_by_camera(small, batch):
    """A constant added to every image of one camera's global feature is removed: with camera centring, eval
    features of a camera's images are the plain features minus that camera's running mean."""
    model = small.model(camera_centering=True)
    model.train()
    model(batch["img"], batch["pid"], batch["camid"], batch["mask"], batch["occlusion"])["loss"].backward()
    cc = model.camera_centering
    assert cc.running_mean.shape == (small.num_cameras, 1 + 8 + 3, small.config["embed_dim"])
    assert model.teacher_centering is not None and cc.seen[batch["camid"]].all()
    model.eval()
    out = model(batch["img"], batch["camid"])
    assert out["features"].shape == (4, 9, small.config["embed_dim"])
    M = model.forward_encoder(batch["img"], batch["camid"], model.text_keys())
    G = model.forward_global(M)
    g = model.global_neck.bn(G[:, 0] - cc.running_mean[batch["camid"], 0])
    torch.testing.assert_close(out["features"][:, 0], torch.nn.functional.normalize(g, dim=-1))
    torch.testing.assert_close(model(batch["img"], batch["camid"], global_only=True)["features"], out["features"][:, 0])
    plain = small.model(camera_centering=True, parts=False, teacher_student=False, amgd=False, part_recon=False)
    assert plain.camera_centering.num_slots == 1 and plain.teacher_centering is None
