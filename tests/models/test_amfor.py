"""The composed AMFOR model: outputs, gradients, switches, eval purity, errors, backends."""

from __future__ import annotations

import itertools

import pytest
import torch

from amfor.models import LOSS_WEIGHTS, SWITCHES
from amfor.ops import available_backends, use_backend


def train_step(model, batch):
    model.train()
    out = model(batch["img"], batch["pid"], batch["camid"], batch["mask"], batch["occlusion"])
    out["loss"].backward()
    return out


def valid_switches():
    """Every switch combination the dependencies allow (teacher_student and part_recon need parts, amgd needs
    teacher_student)."""
    for values in itertools.product([False, True], repeat=len(SWITCHES)):
        s = dict(zip(SWITCHES, values, strict=True))
        if (s["teacher_student"] or s["part_recon"]) and not s["parts"]:
            continue
        if s["amgd"] and not s["teacher_student"]:
            continue
        yield s


COMBOS = list(valid_switches())


def expected_terms(s):
    terms = {"id", "triplet"}  # i2t is weighted 0 by default: not computed
    if s["parts"]:
        terms |= {"visibility", "triplet_parts", "diversity", "id_foreground", "parsing", "id_parts", "id_granularity"}
    if s["amgd"]:
        terms.add("amgd")
    if s["part_recon"]:
        terms |= {"id_recon", "part_reconstruction"}
    if s["hpr"]:
        terms.add("reconstruction")
    return {f"loss_{t}" for t in terms}


def test_the_combinations_are_the_documented_ones():
    assert len(COMBOS) == 56  # 8 for amff x text x hpr, times 7 for parts / teacher / amgd / part_recon


@pytest.mark.slow
@pytest.mark.parametrize("switches", COMBOS, ids=lambda s: "-".join(k for k, v in s.items() if v) or "baseline")
def test_every_switch_combination_trains_and_every_parameter_gets_a_gradient(switches, batch, small):
    model = small.model(**switches)
    out = train_step(model, batch)
    losses = {k for k in out if k.startswith("loss_")}
    assert losses == expected_terms(switches)
    for k in losses | {"loss"}:
        assert torch.isfinite(out[k]), k
    unused = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert unused == []
    model.eval()
    feats = model(batch["img"], batch["camid"])
    P = 1 + (model.num_parts if switches["parts"] else 0)
    assert feats["features"].shape == (4, P, small.config["embed_dim"]) and feats["visibility"].shape == (4, P)


def test_total_is_the_weighted_sum_of_the_terms(batch, small):
    weights = {"id": 2.0, "reconstruction": 0.5, "amgd": 0.0}
    model = small.model(loss_weights=weights)
    model.train()
    torch.manual_seed(1)
    out = model(batch["img"], batch["pid"], batch["camid"], batch["mask"], batch["occlusion"])
    total = sum(model.loss_weights[k[5:]] * v for k, v in out.items() if k.startswith("loss_"))
    torch.testing.assert_close(out["loss"], total)
    assert model.loss_weights["id"] == 2.0 and model.loss_weights["triplet"] == 1.0


def test_stage2_i2t_loss_is_off_by_default_and_a_loss_weight_turns_it_on(batch, small):
    """CLIP-ReID's stage-2 image-to-text loss is not in the spec: weighted 0 (not computed) unless asked for. After
    stage 1 the bank and everything that built it (prompts, text_to_visual) are frozen either way."""
    default = small.model()
    assert "loss_i2t" not in train_step(default, batch)
    assert not any(p.requires_grad for p in default.stage1_parameters())
    model = small.model(loss_weights={"i2t": 1.0})
    out = train_step(model, batch)
    assert torch.isfinite(out["loss_i2t"]) and out["loss_i2t"] > 0
    g = model.backbone.cls_token.grad
    without = small.model(loss_weights={"i2t": 1.0})
    without.loss_weights["i2t"] = 0.0
    train_step(without, batch)
    assert not torch.equal(g, without.backbone.cls_token.grad)  # the term reaches the encoder


@pytest.mark.parametrize("hpr_fusion", [False, True])
def test_the_masked_view_runs_with_or_without_the_fusion_points(hpr_fusion, batch, small):
    model = small.model(hpr_fusion=hpr_fusion)
    calls = []
    model.fusion.register_forward_hook(lambda *a: calls.append(1))
    out = train_step(model, batch)
    assert torch.isfinite(out["loss_reconstruction"]) and len(calls) == 2 * (1 + hpr_fusion)  # 2 fusion points


def test_hpr_fraction_gives_a_masked_view_to_an_even_share_of_the_batch(batch, small):
    model = small.model(hpr_fraction=0.5)
    assert model.masked_view_rows(4).tolist() == [0, 2]
    model.hpr_fraction = 0.25
    assert model.masked_view_rows(64).tolist() == list(range(0, 64, 4))  # one image of each PK identity (K = 4)
    model.hpr_fraction = 0.5
    sizes = []
    model.patch_decoder.register_forward_hook(lambda mod, args, out: sizes.append(out.shape[0]))
    keys = model.text_keys()
    torch.manual_seed(1)
    part = model.forward_masked_view(batch["img"], batch["camid"], batch["occlusion"], keys)
    model.hpr_fraction = 1.0
    rows = [0, 2]
    torch.manual_seed(1)
    whole = model.forward_masked_view(batch["img"][rows], batch["camid"][rows], batch["occlusion"][rows], keys)
    assert sizes == [2, 2]
    assert torch.equal(part["reconstruction"], whole["reconstruction"])  # the sub-batch's own loss
    model.hpr_fraction = 0.5
    out = train_step(model, batch)  # in the step: finite and still training the patch decoder
    assert torch.isfinite(out["loss_reconstruction"]) and model.patch_decoder.pred.weight.grad is not None
    with pytest.raises(ValueError, match="hpr_fraction must be in"):
        small.model(hpr_fraction=0.0)


@pytest.mark.parametrize("parts", [True, False])
def test_masked_consistency_is_off_by_default_and_reads_the_camera_means_without_moving_them(parts, batch, small):
    switches = dict(camera_centering=True) if parts else dict(camera_centering=True, parts=False, teacher_student=False,
                                                              amgd=False, part_recon=False)
    off = small.model(**switches)
    torch.manual_seed(3)
    assert "loss_masked_consistency" not in train_step(off, batch)
    on = small.model(**switches, loss_weights={"masked_consistency": 1.0})
    torch.manual_seed(3)
    out = train_step(on, batch)
    assert 0 <= out["loss_masked_consistency"].item() <= 2
    assert torch.equal(on.camera_centering.running_mean, off.camera_centering.running_mean)  # the full view's only
    assert not torch.equal(on.backbone.cls_token.grad, off.backbone.cls_token.grad)  # the term reaches the encoder


def test_only_the_students_parts_move_the_running_statistics_inference_uses(batch, small):
    """The teacher pass and the rebuilt parts share the parts' BNNeck classifier but not its running statistics."""
    import copy

    from amfor.models.heads import batch_norm_untracked

    model = small.model()  # teacher-student and part reconstruction on
    seen = []
    model.parts_neck.bn.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().clone()))
    train_step(model, batch)
    assert len(seen) == 1  # the student's parts alone went through the tracking BN
    expected = 0.1 * seen[0].mean(0)  # momentum 0.1 from zero
    assert torch.allclose(model.parts_neck.bn.running_mean, expected, atol=1e-6)
    bn = copy.deepcopy(model.parts_neck.bn).train()
    x = torch.randn(5, bn.num_features)
    before = bn.running_mean.clone()
    assert torch.allclose(batch_norm_untracked(bn, x), bn(x), atol=1e-6)  # the same normalisation ...
    assert not torch.equal(bn.running_mean, before)  # ... where the module's own call moves the statistics


def test_unknown_loss_weight_and_bad_switches(small):
    with pytest.raises(ValueError, match="unknown loss weight 'idd'"):
        small.model(loss_weights={"idd": 1.0})
    with pytest.raises(ValueError, match="amgd=True needs teacher_student=True"):
        small.model(teacher_student=False)
    with pytest.raises(ValueError, match="teacher_student=True needs parts=True"):
        small.model(parts=False, amgd=False)


def test_eval_is_deterministic_and_runs_no_training_branch(batch, small):
    model = small.model()
    model.train()
    for _ in range(2):  # move the BN statistics away from their initial values
        train_step(model, batch)
    model.eval()
    called = []
    for name in ("amgd", "patch_decoder", "part_reconstructor"):
        getattr(model, name).register_forward_hook(lambda *a, name=name: called.append(name))
    rng = torch.get_rng_state()
    first = model(batch["img"], batch["camid"])
    second = model(batch["img"], batch["camid"])
    assert torch.equal(torch.get_rng_state(), rng), "eval drew random numbers (a teacher mask or a masked view)"
    assert called == []
    for key in ("features", "visibility"):
        assert torch.equal(first[key], second[key])
    norms = first["features"].norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    assert set(first["visibility"].unique().tolist()) <= {0.0, 1.0} and bool((first["visibility"][:, 0] == 1).all())
    glob = model(batch["img"], batch["camid"], global_only=True)["features"]
    assert glob.shape == (4, small.config["embed_dim"])
    torch.testing.assert_close(glob, first["features"][:, 0])


def test_recon_fill_counts_rebuilt_parts_where_the_head_says_hidden(batch, small):
    with pytest.raises(ValueError, match="recon_fill=True .* needs part_recon=True"):
        small.model(part_recon=False, recon_fill=True)
    model = small.model()
    for _ in range(2):
        train_step(model, batch)
    filled = small.model(recon_fill=True)
    filled.load_state_dict(model.state_dict())  # recon_fill adds no parameter
    model.eval(), filled.eval()
    with torch.no_grad():
        plain, out = model(batch["img"], batch["camid"]), filled(batch["img"], batch["camid"])
    hidden = plain["visibility"] == 0
    assert bool(hidden.any()) and bool((out["visibility"] == 1).all())
    torch.testing.assert_close(out["features"][~hidden], plain["features"][~hidden])
    assert not torch.allclose(out["features"][hidden], plain["features"][hidden])
    norms = out["features"].norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_eval_without_parts_gives_the_global_feature(batch, small):
    model = small.model(parts=False, teacher_student=False, amgd=False, part_recon=False).eval()
    out = model(batch["img"], batch["camid"])
    assert out["features"].shape == (4, 1, small.config["embed_dim"]) and bool((out["visibility"] == 1).all())


def test_a_fresh_model_runs_with_one_warning_and_stage1_freezes_the_bank(small):
    """Without stage 1 the bank is built from the current prompts (one warning, then none); finish_stage1
    rebuilds it from the trained prompts and freezes it into the model's state."""
    import warnings

    from amfor.models import AMFOR

    model = AMFOR(small.num_classes, small.num_cameras, **small.config)
    b = small.batch(small.config["img_size"])
    with pytest.warns(UserWarning, match="text bank is empty.*finish_stage1") as caught:
        out = model.train()(b["img"], b["pid"], b["camid"])
    assert len([w for w in caught if "text bank" in str(w.message)]) == 1 and torch.isfinite(out["loss"])
    torch.testing.assert_close(model.text.bank, model.text.text_features(torch.arange(small.num_classes)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second forward, in eval, warns no more
        assert model.eval()(b["img"], b["camid"])["features"].shape == (4, 9, small.config["embed_dim"])
    model = AMFOR(small.num_classes, small.num_cameras, **small.config)
    feats = torch.randn(4, small.config["embed_dim"])
    stage1 = model.stage1_loss(feats, b["pid"])
    stage1["loss"].backward()
    trained = list(model.stage1_parameters())
    assert all(p.grad is not None for p in trained)
    assert all(p.grad is None for p in model.backbone.parameters())
    model.finish_stage1()
    assert model.text.ready and bool(model.text.bank_ready) and not model.text.prompts.context.requires_grad
    expected = model.text.text_features(torch.arange(small.num_classes))
    torch.testing.assert_close(model.state_dict()["text.bank"], expected)
    fresh = AMFOR(small.num_classes, small.num_cameras, **small.config)
    assert not fresh.text.ready
    fresh.load_state_dict(model.state_dict())
    assert fresh.text.ready  # the bank comes back with a checkpoint


def test_stage1_features_are_the_global_feature(batch, small):
    model = small.model().eval()
    with torch.no_grad():
        g = model.stage1_features(batch["img"], batch["camid"])
    assert g.shape == (4, small.config["embed_dim"]) and torch.isfinite(g).all()


def test_stage1_losses_fall_when_the_prompts_learn(small):
    model = small.model()
    torch.manual_seed(0)
    feats = torch.randn(12, small.config["embed_dim"])
    pids = torch.arange(12) % small.num_classes
    model.text.prompts.context.requires_grad_(True)
    opt = torch.optim.Adam(model.stage1_parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = model.stage1_loss(feats, pids)["loss"]
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


@pytest.mark.parametrize("bad, match", [
    (dict(img=torch.randn(4, 3, 32, 32)), r"image must be \[B, 3, 64, 32\]"),
    (dict(img=torch.zeros(4, 3, 64, 32, dtype=torch.uint8)), r"images must be floating point"),
    (dict(camid=torch.tensor([0, 1, 2, 3])), r"camids must lie in \[0, 3\)"),
    (dict(camid=torch.tensor([0, 1, 2, -2])), r"camids must lie in \[0, 3\).*-1 for an unknown camera"),
    (dict(camid=torch.tensor([0.0, 1.0, 2.0, 0.0])), r"camids must be an integer tensor of shape \[4\]"),
    (dict(pid=torch.tensor([0, 0, 1, 6])), r"pids must lie in \[0, num_classes = 6\)"),
    (dict(pid=torch.tensor([0, 0, 1])), r"pids must be an integer tensor of shape \[4\]"),
    (dict(mask=torch.zeros(4, 32, 32, dtype=torch.long)), r"masks must be \[B, H, W\]"),
])
@pytest.mark.parametrize("stage1", [True, False])
def test_bad_input_gets_a_clear_error_before_anything_runs(bad, match, stage1, small, monkeypatch):
    """The input is checked first: a fresh model (no text bank yet) reports the bad input, not the bank, and
    nothing has run (no warning, no camera mean or BN statistic moved)."""
    from amfor.models import AMFOR

    model = small.model(camera_centering=True) if stage1 else AMFOR(small.num_classes, small.num_cameras,
                                                                      **small.config, camera_centering=True)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    b = {**small.batch(small.config["img_size"]), **bad}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=match):
            model(b["img"], b["pid"], b["camid"], b["mask"], b["occlusion"])
        if "pid" not in bad and "mask" not in bad:
            with pytest.raises(ValueError, match=match):
                model.eval()(b["img"], b["camid"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_the_ranges_are_checked_once_per_forward_with_one_host_sync(small, batch, monkeypatch):
    """pids and camids are checked together at the model's entry; the backbone and the camera centring called
    inside do not check again; the check reads the device once (one bool of a tensor)."""
    import amfor.models.amfor as amfor_module
    import amfor.models.backbone as backbone_module
    import amfor.models.camera as camera_module
    import amfor.models.inputs as inputs

    calls = []
    real = inputs.check_ranges

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    for module in (amfor_module, backbone_module, camera_module):
        monkeypatch.setattr(module, "check_ranges", spy)
    model = small.model(camera_centering=True)
    train_step(model, batch)
    assert len(calls) == 1
    model.eval()(batch["img"], batch["camid"])
    assert len(calls) == 2
    reads = []
    real_bool = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: reads.append(1) or real_bool(t))
    model.check_inputs(batch["img"], batch["pid"], batch["camid"], batch["mask"], batch["occlusion"])
    assert len(reads) == 1


def test_a_non_checkpoint_file_is_named(tmp_path):
    from amfor import create_model

    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(Exception, match="weights.pth"):
        create_model("amfor_vit_tiny_patch16", num_classes=4, pretrained=str(bad))


def test_loading_a_transreid_style_checkpoint_with_another_grid(tmp_path):
    from amfor import create_model
    from amfor.models import ReIDViT

    torch.manual_seed(0)
    src = ReIDViT((128, 64), 16, 12, embed_dim=192, depth=6, num_heads=3, drop_path_rate=0.0)  # 10 x 5 grid
    state = {f"module.base.{k}": v for k, v in src.state_dict().items()}
    state["module.classifier.weight"] = torch.zeros(4, 192)
    path = tmp_path / "transreid.pth"
    torch.save(state, path)
    model = create_model("amfor_vit_tiny_patch16", num_classes=4, pretrained=str(path))  # stride 16: 8 x 4 grid
    got = model.backbone.state_dict()
    torch.testing.assert_close(got["blocks.2.attn.qkv.weight"], src.state_dict()["blocks.2.attn.qkv.weight"])
    torch.testing.assert_close(got["last_block.mlp.fc1.weight"], src.state_dict()["last_block.mlp.fc1.weight"])
    assert got["pos_embed"].shape == (1, 1 + 8 * 4, 192)


def seeded_step(model, batch, backend):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    with use_backend(backend):
        out = train_step(model, batch)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads


@pytest.mark.parametrize("backend", [b for b in ("cpp", "triton") if b in available_backends("cpu")])
def test_the_backend_changes_speed_not_results(backend, batch, small):
    model = small.model()
    ref_out, ref_grads = seeded_step(model, batch, "torch")
    out, grads = seeded_step(model, batch, backend)
    for k in ref_out:
        torch.testing.assert_close(out[k], ref_out[k], rtol=1e-4, atol=1e-5, msg=k)
    assert grads.keys() == ref_grads.keys()
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-3, atol=1e-5, msg=n)


def test_bf16_autocast_trains_and_evaluates_close_to_float32(batch, small):
    """Every component under bf16 autocast (train.amp=bf16; CPU here, the same autocast rules as a GPU's): the
    fused ops take the mix of bf16 and float32 inputs autocast produces; losses and features near float32's."""
    model = small.model()
    ref, _ = seeded_step(model, batch, "torch")
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = train_step(model, batch)
    for k, v in ref.items():
        if k.startswith("loss"):
            assert torch.isfinite(out[k]), k
            torch.testing.assert_close(out[k].float(), v, rtol=0.1, atol=0.05, msg=k)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad():
        want = model(batch["img"], batch["camid"])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(batch["img"], batch["camid"])
    torch.testing.assert_close(got["features"].float(), want["features"], rtol=0.05, atol=0.05)
    assert (got["visibility"].float() == want["visibility"]).float().mean() >= 0.9  # thresholded: a near-0.5 may flip


def test_thin_parts_are_visible_and_supervised(small):
    """A thin arm strip loses every token's majority vote; the soft targets and the area-based visibility keep
    it, the hard reading (parsing_targets="hard") drops it; an image without a mask takes the pseudo-label."""
    H, W = small.config["img_size"]
    masks = torch.zeros(3, H, W, dtype=torch.long)
    masks[:, :16, :] = 1  # head: two whole tokens
    masks[:, 16:32, :5] = 2  # left arm: 80 px of one token's 256
    masks[1, 16:32, 28:] = 3  # right arm: 64 px = exactly visible_area (0.25) of a token
    masks[2] = -1
    probs = torch.full((3, 8, 9), 1 / 9)
    probs[2, 0, 5] = 0.9  # the pseudo-label of the image without a mask: part 5 (left leg)
    model = small.model()
    soft = model.token_targets(masks)
    assert soft.shape == (3, 8, 9)
    vis = model.visibility_targets(soft, probs)
    assert vis[0].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert vis[1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert vis[2].tolist() == [0, 0, 0, 0, 1, 0, 0, 0]
    hard = small.model(parsing_targets="hard")
    assert hard.visibility_targets(hard.token_targets(masks), probs)[0].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="parsing_targets"):
        small.model(parsing_targets="majority")
    with pytest.raises(ValueError, match="visible_area"):
        small.model(visible_area=0)


def only(*terms):
    """Loss weights that keep `terms` and zero every other one."""
    return {k: float(k in terms) for k in LOSS_WEIGHTS}


def has_grad(module):
    return any(p.grad is not None and bool(p.grad.any()) for p in module.parameters())


@pytest.mark.parametrize("neck", ["shared", "own"])
def test_the_rebuilt_parts_are_classified_by_the_student_neck_or_their_own(neck, batch, small):
    model = small.model(recon_neck=neck, loss_weights=only("id_recon"))
    train_step(model, batch)
    assert (model.recon_neck is None) == (neck == "shared")
    assert has_grad(model.parts_neck) == (neck == "shared")
    if neck == "own":
        assert has_grad(model.recon_neck) and model.recon_neck is not model.parts_neck
    assert has_grad(model.part_reconstructor) and has_grad(model.backbone)
    with pytest.raises(ValueError, match="recon_neck must be"):
        small.model(recon_neck="separate")


@pytest.mark.parametrize("detach", [False, True])
def test_recon_detach_keeps_the_part_level_losses_out_of_the_encoder(detach, batch, small):
    model = small.model(recon_detach=detach, loss_weights=only("id_recon", "part_reconstruction"))
    out = train_step(model, batch)
    assert torch.isfinite(out["loss_id_recon"]) and torch.isfinite(out["loss_part_reconstruction"])
    assert has_grad(model.part_reconstructor)
    assert has_grad(model.backbone) != detach and has_grad(model.part_decoder) != detach


def test_teacher_id_share_weighs_the_teacher_against_the_student(batch, small):
    """id_parts and id_granularity are (1 - a) x student + a x teacher; a = 0.5 (the default) is their mean."""
    model = small.model()
    model.train()

    def terms(share):
        model.teacher_id_share = share
        torch.manual_seed(1)  # the same teacher masks and masking noise for every share
        out = model(batch["img"], batch["pid"], batch["camid"], batch["mask"], batch["occlusion"])
        return torch.stack([out["loss_id_parts"], out["loss_id_granularity"]]).detach()

    student, teacher = terms(0.0), terms(1.0)
    assert not torch.allclose(student, teacher)  # the two passes differ, so the checks below can fail
    for share in (0.5, 0.3):
        assert torch.allclose(terms(share), (1 - share) * student + share * teacher, rtol=1e-5)
    assert small.model().teacher_id_share == 0.5
    with pytest.raises(ValueError, match="teacher_id_share must be in"):
        small.model(teacher_id_share=1.5)
