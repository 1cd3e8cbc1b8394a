"""The fake-CUDA tier (amfor.testing.fake_cuda): the model's CUDA path on a machine without a GPU.

Every backend (auto, triton, cuda, torch) under bf16 and fp16 autocast runs the training forward with every
component on, eval and stage 1 on fake CUDA tensors: no device mismatch (FakeTensorMode raises on one), the dtypes
each amfor op receives, float32 losses. The whole Stage2Trainer step (forward, backward, clipping, GradScaler,
optimizer) runs on fake CPU tensors (backward on fake CUDA needs a GPU runtime). A planted CPU tensor and a planted
dtype mix each fail. Host synchronisations are counted: at most one per training step of the model.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from amfor.models import AMFOR
from amfor.models.amfor import LOSS_WEIGHTS
from amfor.ops import masked_patches, unavailable_reasons, use_backend
from amfor.testing import HostSyncError, OpInputError, fake_cuda, fake_tensors

SMALL = dict(img_size=(64, 32), patch_size=16, stride=16, embed_dim=64, depth=3, num_heads=2, drop_path_rate=0.0,
             text_width=32, text_heads=2, text_layers=1, text_dim=32, fusion_points=(1, 2), part_heads=2,
             part_ffn_dim=128, hpr_dim=32, hpr_depth=1, hpr_heads=2, recon_dim=32, recon_depth=1, recon_heads=2,
             camera_centering=True)  # every component on, camera centring too
NUM_CLASSES, NUM_CAMERAS = 6, 3
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}
MODEL_OPS = {"masked_gather", "masked_scatter", "query_fusion_attention", "distill_kl_loss"}  # what the step calls
GPU_BACKENDS = {"auto": ("cuda", "triton"), "triton": ("triton",), "cuda": ("cuda",), "torch": ("torch",)}


def small_model() -> AMFOR:
    torch.manual_seed(0)
    model = AMFOR(NUM_CLASSES, NUM_CAMERAS, **SMALL)
    model.finish_stage1()
    return model


def make_batch(batch: int = 4) -> dict[str, torch.Tensor]:
    """Two images per identity, part masks (the last image without), an occluded band on the first."""
    g = torch.Generator().manual_seed(0)
    H, W = SMALL["img_size"]
    masks = torch.randint(0, 9, (batch, H, W), generator=g)
    masks[-1] = -1
    occlusion = torch.zeros(batch, H, W, dtype=torch.bool)
    occlusion[0, H // 2:] = True
    return {"img": torch.randn(batch, 3, H, W, generator=g), "pid": torch.arange(batch) // 2,
            "camid": torch.randint(0, NUM_CAMERAS, (batch,), generator=g), "mask": masks, "occlusion": occlusion}


def on_tier(tier, model: AMFOR) -> tuple[AMFOR, dict[str, torch.Tensor]]:
    return tier.module(model), {k: tier.tensor(v) for k, v in make_batch().items()}


def train_forward(model, b):
    return model(b["img"], b["pid"], b["camid"], masks=b["mask"], occlusion=b["occlusion"])


def skip_unless_runs(backend: str, device: str) -> None:
    """The cuda backend needs amfor._C built with CUDA kernels; the fake tier cannot stand in for a missing build."""
    if backend in ("auto", "torch"):
        return
    missing = {r for op in MODEL_OPS for r in [unavailable_reasons(device, op).get(backend)] if r}
    if missing:
        pytest.skip(f"{backend} on {device}: {'; '.join(sorted(missing))}")


def assert_ops(tier, backend: str, device: str, dtype: torch.dtype) -> None:
    """Every op the step calls ran, on `device`, in `dtype`, with the backend chosen; the kernels ran too."""
    called = {op for op, *_ in tier.ops}
    assert called == MODEL_OPS, f"ops called: {sorted(called)}"
    for op, dev, dt, chosen in tier.ops:
        assert dev.type == device and dt == dtype, f"{op} got {dt} on {dev}, expected {dtype} on {device}"
        assert chosen in GPU_BACKENDS[backend] if device == "cuda" else chosen == backend, f"{op} ran {chosen}"
    ran = {name.split(".")[1] for name, _, _ in tier.op_inputs}
    if backend != "torch":
        assert {op.removesuffix("_triton") for op in ran} >= MODEL_OPS, f"kernels that ran: {sorted(ran)}"
    for name, devices, dtypes in tier.op_inputs:  # one device; the data in `dtype` (weights, lse in float32)
        assert devices == (f"{device}:0" if device == "cuda" else device,), f"{name} got {devices}"
        assert dtype in dtypes and set(dtypes) <= {dtype, torch.float32}, f"{name} got {dtypes}"


@pytest.mark.slow
@pytest.mark.parametrize("amp", AMP)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_train_eval_and_stage1_on_fake_cuda(backend, amp):
    skip_unless_runs(backend, "cuda")
    dtype = AMP[amp]
    real = small_model()
    with fake_cuda() as tier, use_backend(backend):
        model, b = on_tier(tier, real)
        tier.reset()
        with torch.autocast("cuda", dtype=dtype):
            out = train_forward(model, b)
        losses = {k: v for k, v in out.items() if k.startswith("loss")}
        terms = {"loss"} | {f"loss_{k}" for k, w in LOSS_WEIGHTS.items() if w}  # every weighted term: all on
        assert set(losses) == terms, sorted(set(losses) ^ terms)
        for name, loss in losses.items():
            assert loss.shape == () and loss.dtype == torch.float32 and loss.device.type == "cuda", \
                f"{name}: {loss.dtype} {list(loss.shape)} on {loss.device}"
        assert_ops(tier, backend, "cuda", dtype)
        assert not [s for s in tier.syncs if "copy" in s[0]], tier.syncs  # nothing is copied to the host

        tier.reset()
        model.eval()
        with torch.autocast("cuda", dtype=dtype), torch.no_grad():
            ev = model(b["img"], b["camid"])
            feats = model.stage1_features(b["img"], b["camid"])
        B, P, D = 4, model.num_parts, SMALL["embed_dim"]
        assert ev["features"].shape == (B, 1 + P, D) and ev["visibility"].shape == (B, 1 + P)
        assert ev["features"].device.type == "cuda" and ev["features"].dtype == torch.float32
        assert feats.shape == (B, D) and feats.device.type == "cuda" and feats.dtype == torch.float32  # LayerNorm
        assert {op for op, *_ in tier.ops} == {"query_fusion_attention"}  # eval: no masked view, no distillation

        model.train()
        with torch.autocast("cuda", dtype=dtype):
            s1 = model.stage1_loss(feats, b["pid"])
        assert all(v.dtype == torch.float32 and v.device.type == "cuda" for v in s1.values()), s1


class OneBatchLoader:
    """What Stage2Trainer reads of a loader: one epoch of one batch."""

    def __init__(self, batch: dict) -> None:
        self.batch, self.batch_sampler = batch, SimpleNamespace(per_rank=batch["img"].shape[0])

    def epoch_length(self, epoch: int) -> int:
        return 1

    def epoch_iter(self, epoch: int, start: int):
        return iter([self.batch])

    def close(self) -> None: ...


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_a_whole_stage2_step_on_fake_cpu(backend):
    """Forward, backward, clipping, GradScaler (fp16) and the optimizer on fake CPU tensors. The loader's
    host-side mask check reads a fake value, answered False: this step runs without masks (the forward tests and
    the sync count run them)."""
    from amfor.engine.optim import WarmupCosine, build_stage2_optimizer
    from amfor.engine.trainer import Stage2Trainer

    skip_unless_runs(backend, "cpu")
    cfg = SimpleNamespace(lr=0.01, weight_decay=1e-4, bias_lr_factor=2.0, momentum=0.9, optimizer="sgd")
    real = small_model()
    with fake_tensors("cpu") as tier, use_backend(backend):
        model, b = on_tier(tier, real)
        optimizer = build_stage2_optimizer(model, cfg)
        trainer = Stage2Trainer(model, OneBatchLoader(b), optimizer, WarmupCosine(optimizer, 1, 0, 0.1, 0.0), 1,
                                torch.device("cpu"), amp_dtype=torch.float16, clip_grad=5.0)
        trainer.train()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        assert params and all(p.grad is not None and p.grad.dtype == torch.float32 for p in params), \
            "a trainable parameter got no float32 gradient"
        assert all("momentum_buffer" in optimizer.state[p] for p in params), "the optimizer did not step"
        assert {"loss", "loss_amgd", "loss_reconstruction", "grad_norm"} <= set(trainer.loss_names)
        window = trainer._window_sum  # the step's values, checked (the count it read is a fake value: not tested)
        assert window.dtype == torch.float32 and window.shape == (len(trainer.loss_names),)
    assert_ops(tier, backend, "cpu", torch.float16)
    assert any("trainer.py" in site for _, site in tier.syncs), "the GradScaler's step read (outside the model)"


def test_a_cpu_tensor_planted_in_the_model_fails():
    real = small_model()
    with fake_cuda() as tier:
        model, b = on_tier(tier, real)
        cls = model.backbone.cls_token
        model.backbone.cls_token = torch.nn.Parameter(torch.zeros(cls.shape))  # on the CPU
        with pytest.raises(RuntimeError, match=r"two devices, (cpu and cuda|cuda:0 and cpu)"):
            train_forward(model, b)


def test_a_planted_dtype_mix_fails(monkeypatch):
    """The op wrapper forgets to cast the float32 position embedding to the bf16 tokens: the kernel gets a mix."""
    monkeypatch.setattr(masked_patches, "_flat_pos_embed", lambda pos, num_tokens, ref: pos)  # [N, D], float32
    skip_unless_runs("cuda", "cuda")
    real = small_model()
    with fake_cuda() as tier, use_backend("cuda"):
        model, b = on_tier(tier, real)
        with torch.autocast("cuda", dtype=torch.bfloat16), pytest.raises(OpInputError, match="masked_gather"):
            train_forward(model, b)


@pytest.mark.slow
def test_a_training_step_of_the_model_synchronises_with_the_host_at_most_once():
    """Forward and backward of the model (the trainer's periodic loss check is outside this count)."""
    real = small_model()
    with fake_tensors("cpu") as tier, use_backend("cpp"):
        model, b = on_tier(tier, real)
        tier.reset()
        train_forward(model, b)["loss"].backward()
        tier.assert_syncs(1, "a training step of the model")


def _loss_calls(tier, decoder, vit):
    """(name, call(check) -> the call, file the check lives in) of each component that can skip its check."""
    from amfor.losses import (
        feature_reconstruction_loss,
        focal_loss,
        identity_loss,
        mask_to_token_fractions,
        parsing_loss,
        part_triplet_loss,
    )
    from amfor.nn import masked_forward_features

    f = tier.tensor
    torch.manual_seed(0)
    pids, vis = f(torch.tensor([0, 0, 1, 1])), f(torch.ones(4, 3))
    parts, mask = f(torch.randn(4, 3, 8)), f(torch.randint(-1, 5, (4, 32, 16)))
    decoder, vit, images = tier.module(decoder), tier.module(vit), f(torch.randn(4, 3, 64, 32))
    latent, index = f(torch.randn(4, 1 + 3, 8)), f(torch.stack([torch.randperm(8)[:3] for _ in range(4)]))
    return [
        ("identity_loss", lambda c: identity_loss(f(torch.randn(4, 5)), pids, check=c), "losses/identity.py"),
        ("focal_loss", lambda c: focal_loss(f(torch.randn(4, 3)), vis, check=c), "losses/focal.py"),
        ("part_triplet_loss", lambda c: part_triplet_loss(parts, pids, None, vis, check=c), "losses/triplet.py"),
        ("feature_reconstruction_loss", lambda c: feature_reconstruction_loss(parts, parts, vis, check=c),
         "losses/reconstruction.py"),
        ("parsing_loss", lambda c: parsing_loss(f(torch.randn(4, 6, 5)), f(torch.randint(-1, 5, (4, 6))), check=c),
         "losses/parsing.py"),
        ("mask_to_token_fractions", lambda c: mask_to_token_fractions(mask, 16, 16, 5, check=c), "nn/patch_grid.py"),
        ("MAEDecoder", lambda c: decoder(latent, index, check_index=c), "nn/masked_vit.py"),
        ("masked_forward_features", lambda c: masked_forward_features(vit, images, index, check_index=c),
         "nn/masked_vit.py"),
    ]


@pytest.mark.parametrize("case", range(8))
def test_components_skip_their_host_synchronising_checks_when_told(case):
    from timm.models.vision_transformer import VisionTransformer

    from amfor.nn import MAEDecoder

    decoder = MAEDecoder(8, 8, 12, decoder_dim=8, num_heads=2)
    vit = VisionTransformer(img_size=(64, 32), patch_size=16, embed_dim=8, depth=1, num_heads=2, num_classes=0)
    with fake_tensors("cpu") as tier:
        name, call, where = _loss_calls(tier, decoder, vit)[case]
        tier.reset()
        call(True)
        assert tier.syncs and all(where in site for _, site in tier.syncs), f"{name}: {tier.syncs}"
        tier.reset()
        call(False)
        assert tier.syncs == [], f"{name}(check=False) still synchronises: {tier.syncs}"


def test_too_many_syncs_fail_naming_where_each_happened():
    from amfor.losses import identity_loss

    with fake_tensors("cpu") as tier:
        identity_loss(tier.tensor(torch.randn(4, 5)), tier.tensor(torch.tensor([0, 1, 2, 3])))
        with pytest.raises(HostSyncError, match=r"(?s)1 times \(at most 0 allowed\).*amfor/utils/ranges.py:\d+ in "
                                                r"out_of_range <- amfor/losses/identity.py:\d+ in identity_loss"):
            tier.assert_syncs(0, "the loss")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_the_training_forward_compiles_without_a_graph_break(backend):
    """torch.compile(fullgraph=True) raises on any graph break (a host read, an untraceable call). The `eager`
    compile backend: dynamo traces the whole forward into one graph, inductor's CPU code generation (minutes on
    two cores) is not run; the seeded result equals the uncompiled one."""
    model, b = small_model(), make_batch()
    with use_backend(backend):
        torch.manual_seed(1)
        want = train_forward(model, b)
        torch._dynamo.reset()
        torch.manual_seed(1)
        got = torch.compile(model, fullgraph=True, backend="eager")(b["img"], b["pid"], b["camid"],
                                                                      masks=b["mask"], occlusion=b["occlusion"])
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=lambda m, k=k: f"{k}: {m}")
