"""DDP runs with find_unused_parameters=false, the default: every trainable parameter of the AMFOR model gets a
gradient in a stage-2 step (a one-process gloo group; DDP's reducer raises on a parameter without one, as the
stand-in, whose visibility head trains nothing, shows)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from standin_model import StandIn
from torch.nn.parallel import DistributedDataParallel

import amfor
from amfor.config import DEMO_SWITCHES, build_config


@pytest.fixture
def gloo(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def batch(size: tuple[int, int], n: int = 4) -> tuple:
    """A PK-like batch of n images (two per identity) with part masks and an occluded lower half on one image."""
    g = torch.Generator().manual_seed(0)
    H, W = size
    occlusion = torch.zeros(n, H, W, dtype=torch.bool)
    occlusion[0, H // 2:] = True
    return (torch.randn(n, 3, H, W, generator=g), torch.arange(n) // 2, torch.arange(n) % 2,
            torch.randint(0, 9, (n, H, W), generator=g), occlusion)


def two_ddp_steps(model: torch.nn.Module) -> DistributedDataParallel:
    """Stage 2 as the runner sets it up (stage 1 finished: its parameters frozen), wrapped with the configured flag;
    two steps."""
    model.finish_stage1()
    ddp = DistributedDataParallel(model, find_unused_parameters=build_config().train.find_unused_parameters)
    img, pid, cam, masks, occ = batch(tuple(model.input_size))
    for _ in range(2):
        ddp.zero_grad(set_to_none=True)
        ddp(img, pid, cam, masks=masks, occlusion=occ)["loss"].backward()
    return ddp


def test_the_default_is_false():
    assert build_config().train.find_unused_parameters is False


@pytest.mark.slow
@pytest.mark.parametrize("switches", ["configured", "every component"])
def test_every_parameter_gets_a_gradient_under_ddp(gloo, switches):
    kwargs = dict(build_config().model.kwargs) if switches == "configured" else dict.fromkeys(DEMO_SWITCHES, True)
    torch.manual_seed(0)
    model = amfor.create_model("amfor_vit_tiny_patch16", 2, num_cameras=2, **kwargs)
    two_ddp_steps(model.train())
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_a_parameter_without_gradient_is_refused(gloo):
    """The check the default relies on: the stand-in's visibility head gets no gradient in training."""
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="find_unused_parameters"):
        two_ddp_steps(StandIn(2, 2).train())
