"""DDP on CPU (gloo, two processes under torchrun) against one process with the same global batch, and a resume
under DDP. The stand-in has no BatchNorm here: on CPU BatchNorm statistics stay per process (SyncBatchNorm
needs CUDA), so only a model without batch statistics can match one process exactly."""

from __future__ import annotations

import sys

import pytest
import torch
from cli_runs import load_weights, read_jsonl, run_cli, standin_overrides

from amfor.utils import distributed as du


def test_shards_cover_in_order():
    for n in (0, 1, 7, 10):
        parts = [range(n)[du.shard(n, r, 3)] for r in range(3)]
        assert [i for p in parts for i in p] == list(range(n))
    assert du.all_gather_cat(torch.arange(5), 5).tolist() == list(range(5))  # one process: identity


def torchrun(args, cwd):
    return run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "amfor.train", *args],
                   cwd, timeout=400)


def losses(path):
    return [(r["stage"], r["step"], r["loss"]) for r in read_jsonl(path / "metrics.jsonl", "train")]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_and_resume_exactly(tiny_root, tmp_path):
    common = {"train.batch_size": 8, "train.epochs": 2, "train.eval_every": 1, "train.keep_checkpoints": 100,
              "train.checkpoint_every": 3, "data.num_workers": 0,
              "train.find_unused_parameters": True}  # the stand-in's visibility head trains nothing
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    run_cli(["-m", "amfor.train", "--set", *standin_overrides(tiny_root, output=one, **common)], tmp_path)
    torchrun(["--set", *standin_overrides(tiny_root, output=two, **common)], tmp_path)

    # the same losses at every step of both stages (rank-averaged) and the same weights, within float tolerance
    l1, l2 = losses(one), losses(two)
    assert [s[:2] for s in l1] == [s[:2] for s in l2] and len(l1) == 12 + 8
    assert torch.allclose(torch.tensor([s[2] for s in l1]), torch.tensor([s[2] for s in l2]), rtol=1e-5, atol=1e-6)
    w1, w2 = load_weights(one / "checkpoints" / "last.pt"), load_weights(two / "checkpoints" / "last.pt")
    moved = load_weights(sorted((one / "checkpoints").glob("stage2_step*.pt"))[0])
    assert not torch.allclose(w1["embed.weight"], moved["embed.weight"])  # training changed the weights
    for k in w1:
        assert torch.allclose(w1[k].float(), w2[k].float(), rtol=1e-4, atol=1e-6), k
    v1, v2 = read_jsonl(one / "metrics.jsonl", "eval"), read_jsonl(two / "metrics.jsonl", "eval")
    assert [r["mAP"] for r in v1] == pytest.approx([r["mAP"] for r in v2], abs=1e-6)

    # resume under DDP from a mid-epoch stage-2 checkpoint (step 3 of 4): bitwise the uninterrupted DDP run
    mid = two / "checkpoints" / "stage2_step0000003.pt"
    assert torch.load(mid, weights_only=True)["trainer"]["batch"] == 3
    assert len(torch.load(mid, weights_only=True)["rng"]) == 2  # every rank's RNG states
    torchrun(["--resume", str(mid), "--output", str(resumed)], tmp_path)
    w3 = load_weights(resumed / "checkpoints" / "last.pt")
    assert all(torch.equal(w2[k], w3[k]) for k in w2)


@pytest.mark.skipif(sys.platform != "linux", reason="uses torchrun's standalone rendezvous")
def test_module_has_no_side_effects_without_torchrun():
    assert not du.is_dist() and du.get_world_size() == 1 and du.is_main()
    assert du.broadcast_object({"a": 1}) == {"a": 1} and du.all_gather_object(3) == [3]
