"""The AMFOR model (docs/spec.md): backbone + AMFF-Encoder, part branch with teacher-student decoder, HPR-Decoder,
BNNeck heads and the loss dict. One method per stage, as MAE: `forward_encoder`, `forward_global`,
`forward_parts`, `forward_masked_view`, `forward_losses`; `forward` dispatches on the mode.

Training: `model(images, pids, camids, masks=None, occlusion=None)` -> {"loss": weighted total, "loss_<term>": ...,
diagnostics}. Eval: `model(images, camids=None)` -> {"features": [B, 1 + P, D], "visibility": [B, 1 + P]}, or
{"features": [B, D]} with `global_only=True`. Eval runs no training-only branch and draws no random number.
Inputs are validated once, at the entry, before anything runs (amfor/models/inputs.py); camids None or -1 is an
unknown camera.

As a timm model: `num_classes=0` builds a headless feature extractor (no identity classifier, no identity prompt;
`reset_classifier(n)` adds them), `forward_features` (the global branch's tokens), `forward_head`, `num_features`,
`pretrained_cfg` (input size, mean, std: the registry's entry).

Every component has a switch (`amff`, `text`, `parts`, `teacher_student`, `amgd`, `hpr`, `part_recon`); all off is
the TransReID-style baseline: ID + triplet on the CLS token. Choices where the paper is silent: docs/model.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from amfor.losses import (
    AMGDLoss,
    diversity_loss,
    feature_reconstruction_loss,
    focal_loss,
    identity_loss,
    parsing_loss,
    part_triplet_loss,
    patch_reconstruction_loss,
    triplet_loss,
)
from amfor.models.backbone import ReIDViT
from amfor.models.camera import CameraCentering
from amfor.models.fusion import AMFFEncoder
from amfor.models.heads import BNNeck, PartNecks
from amfor.models.inputs import check_ids, check_images, check_maps, check_ranges
from amfor.models.parts import PartClassifier, PartDecoder, VisibilityHead, teacher_masks, weighted_pooling
from amfor.models.reconstruction import PartReconstructor, choose_masked_patches
from amfor.models.text import TextBranch, contrastive_losses
from amfor.nn import MAEDecoder
from amfor.nn.patch_grid import mask_to_token_fractions, mask_to_tokens, patch_occlusion, patchify
from amfor.schema import FLIP_PAIRS, NUM_PARTS

LOSS_WEIGHTS = {  # docs/spec.md section 6: every term weighted 1.0
    # i2t: CLIP-ReID's stage-2 image-to-text cross-entropy against the frozen bank. Not in the spec's loss list and
    # off by default: on the validation split it cost 17 points of mAP (docs/model.md, "Text branch").
    "id": 1.0, "triplet": 1.0, "i2t": 0.0,
    "id_parts": 1.0, "id_granularity": 1.0, "id_foreground": 1.0, "triplet_parts": 1.0, "parsing": 1.0,
    "visibility": 1.0, "diversity": 1.0, "amgd": 1.0, "id_recon": 1.0, "part_reconstruction": 1.0,
    "reconstruction": 1.0,
    # masked_consistency: the masked view's global feature pulled to the full view's (cosine), an AMFOR-project
    # addition to the HPR patch level, off by default (docs/model.md, "HPR-Decoder, patch level").
    "masked_consistency": 0.0,
}
SWITCHES = ("amff", "text", "parts", "teacher_student", "amgd", "hpr", "part_recon")


def _part_pairs(pairs: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Label pairs (1-based part labels) -> 0-based part indices."""
    return tuple((a - 1, b - 1) for a, b in pairs)


class AMFOR(nn.Module):
    """AMFOR for occluded person ReID. Flat keyword arguments, as timm's models (see registry.py for the variants)."""

    def __init__(self, num_classes: int, num_cameras: int = 0, *, img_size: tuple[int, int] = (256, 128),
                 patch_size: int = 16, stride: int = 16, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.1, sie_coef: float = 3.0,
                 camera_centering: bool = False, camera_momentum: float = 0.1,
                 # switches
                 amff: bool = True, text: bool = True, parts: bool = True, teacher_student: bool = True,
                 amgd: bool = True, hpr: bool = True, part_recon: bool = True,
                 # text branch
                 text_width: int = 512, text_heads: int = 8, text_layers: int = 12, text_dim: int = 512,
                 text_context: int = 77, clip_weights: str | None = None, text_bank: str = "all",
                 text_temperature: float = 0.05,
                 # AMFF
                 fusion_points: Sequence[int] = (1, 2, 4, 6, 8, 10), fusion_tokens: str = "all",
                 fusion_weighting: str = "softmax", fusion_gate_init: float = -2.0,
                 # parts
                 num_parts: int = NUM_PARTS, part_heads: int = 8, part_ffn_dim: int = 3072, part_depth: int = 1,
                 flip_pairs: Sequence[tuple[int, int]] = FLIP_PAIRS, amgd_temperature: float = 4.0,
                 parsing_targets: str = "soft", visible_area: float = 0.25, teacher_id_share: float = 0.5,
                 # HPR
                 mask_ratio: float = 0.75, hpr_fusion: bool = False, hpr_fraction: float = 1.0, hpr_dim: int = 512,
                 hpr_depth: int = 1, hpr_heads: int = 8,
                 recon_dim: int = 512, recon_depth: int = 3, recon_heads: int = 8, recon_hide_prob: float = 0.25,
                 recon_fill: bool = False, recon_neck: str = "shared", recon_detach: bool = False,
                 # losses
                 loss_weights: Mapping[str, float] | None = None, triplet_margin: float | None = None,
                 label_smoothing: float = 0.0, parsing_smoothing: float = 0.1,
                 pretrained_cfg: Mapping | None = None) -> None:
        super().__init__()
        self._check_switches(amff, text, parts, teacher_student, amgd, hpr, part_recon, num_classes)
        self.num_classes, self.num_parts, self.num_cameras = num_classes, num_parts, num_cameras
        self.num_features = embed_dim  # timm: the width of the features before the classifier
        self.switches = dict(amff=amff, text=text, parts=parts, teacher_student=teacher_student, amgd=amgd, hpr=hpr,
                             part_recon=part_recon)
        self._set_loss_options(loss_weights, triplet_margin, label_smoothing, parsing_smoothing, text_bank,
                               text_temperature)
        self._set_part_options(flip_pairs, parsing_targets, visible_area, teacher_id_share)
        self._set_hpr_options(mask_ratio, hpr_fusion, hpr_fraction, recon_hide_prob, recon_fill, recon_neck,
                              recon_detach, part_recon)

        self.backbone = ReIDViT(img_size, patch_size, stride, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                                mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate, num_cameras=num_cameras,
                                sie_coef=sie_coef)
        self.pretrained_cfg = self._pretrained_cfg(pretrained_cfg)
        self._build_cameras_seen(num_cameras)
        D, C, P = embed_dim, num_classes, num_parts
        self.text = TextBranch(C, D, text_width, text_heads, text_layers, text_dim, text_context,
                               clip_weights) if text else None
        self.fusion = AMFFEncoder(D, num_heads, fusion_points, depth - 1, tokens=fusion_tokens,
                                  weighting=fusion_weighting, gate_init=fusion_gate_init, text=text) if amff else None
        self.global_neck = BNNeck(D, C)
        if parts:
            self._build_part_branch(D, C, P, part_heads, part_ffn_dim, part_depth)
        self.amgd = AMGDLoss(D, P + 2, num_heads=part_heads, temperature=amgd_temperature) if amgd else None
        if hpr:
            self._build_patch_decoder(D, patch_size, hpr_dim, hpr_depth, hpr_heads)
        self._build_part_reconstruction(D, C, P, part_recon, recon_dim, recon_depth, recon_heads, recon_neck)
        self._build_camera_centering(camera_centering, num_cameras, D, P, parts, teacher_student, camera_momentum)

    # -- construction helpers ----------------------------------------------------------------------------------
    def _set_loss_options(self, loss_weights, triplet_margin, label_smoothing, parsing_smoothing, text_bank,
                          text_temperature) -> None:
        self.loss_weights = self._loss_weights(loss_weights)
        self.triplet_margin, self.label_smoothing = triplet_margin, label_smoothing
        self.parsing_smoothing = parsing_smoothing
        self.text_bank_mode, self.text_scale = text_bank, 1.0 / text_temperature

    def _set_part_options(self, flip_pairs, parsing_targets, visible_area, teacher_id_share) -> None:
        self.flip_pairs = tuple(tuple(p) for p in flip_pairs)  # feature indices of [global, P parts] = part labels
        if parsing_targets not in ("soft", "hard"):
            raise ValueError(f"parsing_targets must be 'soft' or 'hard', got {parsing_targets!r}")
        if not visible_area > 0:
            raise ValueError(f"visible_area must be > 0 (a share of one token's window), got {visible_area}")
        self.parsing_targets, self.visible_area = parsing_targets, float(visible_area)
        if not 0 <= teacher_id_share <= 1:
            raise ValueError(f"teacher_id_share must be in [0, 1] (the teacher's share of the part identity losses), "
                             f"got {teacher_id_share}")
        self.teacher_id_share = float(teacher_id_share)

    def _set_hpr_options(self, mask_ratio, hpr_fusion, hpr_fraction, recon_hide_prob, recon_fill, recon_neck,
                         recon_detach, part_recon) -> None:
        self.mask_ratio, self.hpr_fusion, self.recon_hide_prob = mask_ratio, hpr_fusion, recon_hide_prob
        if not 0 < hpr_fraction <= 1:
            raise ValueError(f"hpr_fraction must be in (0, 1] (the share of the batch given a masked view), got "
                             f"{hpr_fraction}")
        self.hpr_fraction = float(hpr_fraction)
        if recon_fill and not part_recon:
            raise ValueError("recon_fill=True (rebuilt parts at inference) needs part_recon=True")
        self.recon_fill = bool(recon_fill)
        if recon_neck not in ("shared", "own"):
            raise ValueError(f"recon_neck must be 'shared' or 'own', got {recon_neck!r}")
        self.recon_detach = bool(recon_detach)

    def _build_cameras_seen(self, num_cameras: int) -> None:
        """The cameras seen in training (all, until `set_train_cameras` says otherwise); None without cameras."""
        if num_cameras > 0:
            self.register_buffer("cameras_seen", torch.ones(num_cameras, dtype=torch.bool))
        else:
            self.cameras_seen = None

    def _build_part_branch(self, D: int, C: int, P: int, heads: int, ffn_dim: int, depth: int) -> None:
        """Pixel-to-part classifier, teacher-student part decoder, visibility head and the part branch's necks."""
        self.part_classifier = PartClassifier(D, P)
        self.part_decoder = PartDecoder(D, P, heads, ffn_dim, depth)
        self.visibility_head = VisibilityHead(P, D)
        self.parts_neck = BNNeck(P * D, C)  # cat(parts): student, teacher and rebuilt parts share it
        self.granularity_necks = PartNecks(P + 2, D, C)  # [decoder CLS, P parts, foreground]
        self.foreground_neck = BNNeck(D, C)

    def _build_patch_decoder(self, D: int, patch_size: int, dim: int, depth: int, heads: int) -> None:
        """HPR patch level: the MAE decoder from the masked view's memory to the pixels of every patch."""
        pixels = 3 * patch_size * patch_size
        self.patch_decoder = MAEDecoder(D, self.backbone.num_patches, pixels, dim, depth, heads,
                                        num_prefix_tokens=1, normalize_input=True)  # M is not normalised

    def _build_part_reconstruction(self, D: int, C: int, P: int, on: bool, dim: int, depth: int, heads: int,
                                   neck: str) -> None:
        """HPR part level: the part reconstructor and the rebuilt parts' identity classifier, the student's
        (`shared`: None here) or their own BNNeck (`own`)."""
        self.part_reconstructor = PartReconstructor(D, P, dim, depth, heads) if on else None
        self.recon_neck = BNNeck(P * D, C) if on and neck == "own" else None

    def _build_camera_centering(self, on: bool, num_cameras: int, D: int, P: int, parts: bool, teacher_student: bool,
                                momentum: float) -> None:
        """Slots: [g, decoder outputs (P + 2), foreground] and the teacher's [P + 2, foreground]; None when off."""
        self.camera_centering = self.teacher_centering = None
        if on:
            self.camera_centering = CameraCentering(num_cameras, 1 + (P + 3 if parts else 0), D, momentum)
            if parts and teacher_student:
                self.teacher_centering = CameraCentering(num_cameras, P + 3, D, momentum)

    @staticmethod
    def _check_switches(amff, text, parts, teacher_student, amgd, hpr, part_recon, num_classes) -> None:
        needs = {"teacher_student": ("parts", parts), "amgd": ("teacher_student", teacher_student),
                 "part_recon": ("parts", parts)}
        for name, on in (("teacher_student", teacher_student), ("amgd", amgd), ("part_recon", part_recon)):
            if on and not needs[name][1]:
                raise ValueError(f"{name}=True needs {needs[name][0]}=True")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: a headless feature extractor), got {num_classes}")

    @staticmethod
    def _loss_weights(overrides: Mapping[str, float] | None) -> dict[str, float]:
        weights = dict(LOSS_WEIGHTS)
        for key, value in (overrides or {}).items():
            if key not in weights:
                raise ValueError(f"unknown loss weight {key!r}; the terms are {sorted(weights)}")
            weights[key] = float(value)
        return weights

    def _pretrained_cfg(self, cfg: Mapping | None) -> dict:
        """timm's `pretrained_cfg`: the registry entry's (the defaults of `registry.pretrained_cfg` for a model built
        directly), with this model's input size."""
        from amfor.models.registry import pretrained_cfg as default

        return {**(dict(cfg) if cfg is not None else default()), "input_size": (3, *self.backbone.img_size)}

    @property
    def default_cfg(self) -> dict:
        """timm's older name of `pretrained_cfg`."""
        return self.pretrained_cfg

    @property
    def input_size(self) -> tuple[int, int]:
        return self.backbone.img_size

    @property
    def has_text(self) -> bool:
        return self.text is not None

    def no_weight_decay(self) -> set[str]:
        names = {f"backbone.{n}" for n in self.backbone.no_weight_decay()}
        for name, _ in self.named_parameters():
            if name.endswith(("pos_embed", "mask_token", "queries", "query_embed", "gate", "layer_logits",
                              "_logits", "prompts.context")):
                names.add(name)
        return names

    def load_pretrained(self, path: str):
        """Load backbone weights from a timm / TransReID / HAP checkpoint (see backbone.checkpoint_filter_fn)."""
        return self.backbone.load_pretrained(path)

    # -- stage 1: prompt learning --------------------------------------------------------------------------------
    def stage1_parameters(self) -> Iterator[nn.Parameter]:
        """What stage 1 trains: the identity prompts and text_to_visual (nothing without text)."""
        if self.text is None:
            return iter(())
        return iter([self.text.prompts.context, *self.text.text_to_visual.parameters()])

    def stage1_features(self, images: torch.Tensor, camids: torch.Tensor | None = None) -> torch.Tensor:
        """The image feature prompts are aligned to: g [B, D] from the (frozen) encoder, no text bank."""
        self.check_inputs(images, camids=camids)
        return self.forward_global(self.forward_encoder(images, camids, None))[:, 0]

    def stage1_loss(self, image_feats: torch.Tensor, pids: torch.Tensor) -> dict[str, torch.Tensor]:
        """CLIP-ReID image-text contrastive losses for cached image features [B, D] and their pids [B]."""
        if self.text is None:
            raise RuntimeError("this model has no text branch (text=False): there is no stage 1")
        uniq, labels = torch.unique(pids, return_inverse=True)
        text = self.text.text_to_visual(self.text.text_features(uniq))
        i2t, t2i = contrastive_losses(image_feats, text, labels, self.text_scale)
        return {"loss": i2t + t2i, "loss_i2t": i2t, "loss_t2i": t2i}

    def finish_stage1(self) -> None:
        """Freeze every identity's text feature into the bank used by stage 2 and test, and everything stage 1
        trained with it: the prompts (baked into the bank) and `text_to_visual`, through which the AMFF-Encoder
        (and the i2t loss, when weighted) read the bank. No-op without text."""
        if self.text is not None:
            self.text.build_bank()
            for p in self.stage1_parameters():
                p.requires_grad_(False)

    def text_keys(self) -> torch.Tensor | None:
        """The text bank in visual space [C or 1, D] for the AMFF-Encoder (None without text or AMFF, or without
        identities: a headless model). A bank stage 1 has not filled is built from the current prompts, with one
        warning (a fresh model runs; its text keys are those of untrained prompts)."""
        if self.text is None or self.fusion is None or self.num_classes == 0:
            return None
        if not self.text.ready:
            warnings.warn("the text bank is empty (stage 1 has not run): built from the current, untrained prompts. "
                          "Run stage 1 and call model.finish_stage1() for the trained ones", UserWarning, stacklevel=3)
            self.text.build_bank()
        return self.text.visual_bank(self.text_bank_mode)

    # -- encoder ---------------------------------------------------------------------------------------------------
    def forward_encoder(self, images: torch.Tensor, camids: torch.Tensor | None, text_keys: torch.Tensor | None,
                        index: torch.Tensor | None = None, fusion: bool = True,
                        patches: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens through the shared blocks with AMFF at the fusion points (unless `fusion=False`): the memory M.

        images: [B, 3, H, W]; index: [B, K] kept patches (the masked view) or None (all N); patches: the images'
        patch embedding [B, N, D] when already computed (the two views share it)  ->  M [B, 1 + N', D] with
        N' = K or N.
        """
        x = self.backbone.embed(images, camids, index, seen=self.cameras_seen, patches=patches, check_index=False)
        fuse = self.fusion if fusion else None
        layers = [x]
        for k, blk in enumerate(self.backbone.blocks, start=1):
            x = blk(x)
            if fuse is None:
                continue
            layers.append(x)
            if k in fuse:
                x = fuse(k, layers, text_keys)
        return x

    def forward_global(self, M: torch.Tensor) -> torch.Tensor:
        """The global branch: G = LayerNorm(copy of the last block(M)), [B, 1 + N, D]; g = G[:, 0]."""
        return self.backbone.norm(self.backbone.last_block(M))

    def center(self, g: torch.Tensor, part: dict | None, camids: torch.Tensor | None
               ) -> tuple[torch.Tensor, dict | None]:
        """Camera centring (`camera_centering=True`, camera.py) of the identity features: g [B, D] and the part
        branch's student / teacher decoder outputs [B, P + 2, D] and foregrounds [B, D]; identity when off.
        Without `part`, g alone (slot 0: the global-only model, or global-only inference)."""
        if self.camera_centering is None:
            return g, part
        if part is None:
            only_g = None if self.camera_centering.num_slots == 1 else slice(0, 1)
            return self.camera_centering(g[:, None], camids, slots=only_g, check=False)[:, 0], part
        part = dict(part)  # camids were checked at the model's entry: no range check here
        x = self.camera_centering(torch.cat([g[:, None], part["student"], part["foreground"][:, None]], 1), camids,
                                  check=False)
        g, part["student"], part["foreground"] = x[:, 0], x[:, 1:-1], x[:, -1]
        if "teacher" in part:
            t = self.teacher_centering(torch.cat([part["teacher"], part["teacher_foreground"][:, None]], 1), camids,
                                       check=False)
            part["teacher"], part["teacher_foreground"] = t[:, :-1], t[:, -1]
        return g, part

    # -- part branch -----------------------------------------------------------------------------------------------
    def forward_parts(self, M: torch.Tensor, G: torch.Tensor, teacher: bool) -> dict[str, torch.Tensor]:
        """Part probabilities, foreground, and the student (and teacher) decoder outputs.

        -> part_logits [B, N, 1 + P], probs, foreground [B, D], student [B, P + 2, D] ([CLS, background, parts]),
        vis_logits [B, P]; with `teacher`: teacher [B, P + 2, D], teacher_foreground [B, D].
        """
        tokens = G[:, 1:]
        part_logits = self.part_classifier(tokens)
        probs = part_logits.softmax(-1)
        _, foreground = weighted_pooling(tokens, probs)
        mask = teacher_masks(probs) if teacher else None
        student, teacher_out = self.part_decoder(M, mask)
        out = {"part_logits": part_logits, "probs": probs, "foreground": foreground, "student": student,
               "vis_logits": self.visibility_head(student[:, 2:])}
        if teacher:
            fg = mask[:, 0].to(tokens.dtype)  # the tokens the teacher's CLS query saw: its foreground
            out["teacher"] = teacher_out
            out["teacher_foreground"] = torch.einsum("bn,bnd->bd", fg, tokens) / fg.sum(1, keepdim=True)
        return out

    def visibility_targets(self, targets: torch.Tensor | None, probs: torch.Tensor) -> torch.Tensor:
        """[B, P] float: part p is visible when its area in the token targets [B, N, 1 + P] (summed over the
        tokens, in token windows) is at least `visible_area`; images without a mask (or no masks at all) take
        the pseudo-label max_n prob[n, p] > 0.5."""
        pseudo = (probs.detach()[..., 1:].amax(1) > 0.5).float()
        if targets is None:
            return pseudo
        present = (targets[..., 1:].sum(1) >= self.visible_area).float()
        has_mask = targets.sum((1, 2))[:, None] > 0
        return torch.where(has_mask, present, pseudo)

    def token_targets(self, masks: torch.Tensor | None) -> torch.Tensor | None:
        """Parsing targets per token [B, N, 1 + P] (float; all 0 for an image without a mask) from pixel masks
        [B, H, W], or None without masks: the share of each label in the token's window (`parsing_targets=
        "soft"`, default), or the one-hot majority label (`"hard"`, which loses most arm, leg and foot tokens at
        16x16 patches)."""
        if masks is None:
            return None
        vit, C = self.backbone, self.num_parts + 1
        if self.parsing_targets == "soft":
            return mask_to_token_fractions(masks, vit.patch_size, vit.stride, C, check=False)  # checked at the entry
        labels = mask_to_tokens(masks, vit.patch_size, vit.stride, C, check=False)
        return F.one_hot(labels.clamp(min=0), C).float() * (labels >= 0)[..., None]

    # -- masked view (HPR patch level) ----------------------------------------------------------------------------
    def masked_view_rows(self, batch: int, device=None) -> torch.Tensor | None:
        """Which images get a masked view: all (None) at `hpr_fraction=1`, else n = max(1, round(fraction B)) rows
        spread evenly over the batch ([B/n] apart: with a PK batch of K images per identity and fraction 1/K, one
        image of every identity)."""
        n = max(1, round(batch * self.hpr_fraction))
        if n >= batch:
            return None
        return torch.arange(n, device=device) * batch // n

    def forward_masked_view(self, images: torch.Tensor, camids: torch.Tensor | None, occlusion: torch.Tensor | None,
                            text_keys: torch.Tensor | None, patches: torch.Tensor | None = None,
                            g: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Encoder on the kept patches only, MAE decoder on the full grid: {"reconstruction": the per-patch
        normalised pixel loss}, and with a `masked_consistency` weight and the full view's (centred) global feature
        g [B, D], {"masked_consistency": 1 - cos(masked view's g, g.detach())}.

        patches: the full view's patch embedding [B, N, D] (the same convolution of the same images: computed
        once for both views), or None to compute it here. With `hpr_fraction < 1` only the rows of
        `masked_view_rows` take part."""
        vit = self.backbone
        g = g if self.loss_weights["masked_consistency"] != 0 else None  # no term: no need to gather it
        rows = self.masked_view_rows(images.shape[0], images.device)
        if rows is not None:
            images, camids, occlusion, patches, g = (None if t is None else t[rows]
                                                     for t in (images, camids, occlusion, patches, g))
        B, N = images.shape[0], vit.num_patches
        occluded = None
        if occlusion is not None:
            occluded = patch_occlusion(occlusion, vit.patch_size, vit.stride).flatten(1)
        index, _, target = choose_masked_patches(occluded, B, N, self.mask_ratio, device=images.device)
        latent = self.forward_encoder(images, camids, text_keys, index, fusion=self.hpr_fusion, patches=patches)
        pred = self.patch_decoder(latent, index, check_index=False)  # the indices made above
        pixels = patchify(images, vit.patch_size, vit.stride)
        losses = {"reconstruction": patch_reconstruction_loss(pred, pixels, target)}
        if g is not None:
            g_masked = self.forward_global(latent)[:, 0]
            if self.camera_centering is not None:  # the global slot's running means, read only
                g_masked = self.camera_centering(g_masked[:, None], camids, slots=slice(0, 1), check=False)[:, 0]
            losses["masked_consistency"] = 1 - F.cosine_similarity(g_masked.float(), g.detach().float(), -1).mean()
        return losses

    # -- losses ----------------------------------------------------------------------------------------------------
    def forward_losses(self, g: torch.Tensor, pids: torch.Tensor, part: dict | None,
                       targets: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Unweighted loss terms of the global branch (g [B, D]), the text bank and the part branch."""
        _, logits = self.global_neck(g)
        losses = {"id": identity_loss(logits, pids, self.label_smoothing, check=False),
                  "triplet": triplet_loss(g, pids, self.triplet_margin)}
        if self.text is not None and self.loss_weights["i2t"] != 0:
            bank = self.text.visual_bank("all")
            scores = self.text_scale * F.normalize(g.float(), dim=1) @ F.normalize(bank.float(), dim=1).T
            losses["i2t"] = F.cross_entropy(scores, pids)
        if part is not None:
            losses.update(self.part_losses(part, pids, targets))
        return losses

    def part_losses(self, part: dict, pids: torch.Tensor, targets: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Parsing, visibility, identity over parts and granularities, part triplet, diversity, AMGD, rebuilt parts.

        targets: parsing targets per token [B, N, 1 + P] (`token_targets`; all 0 where an image has no mask) or
        None."""
        B, P = pids.shape[0], self.num_parts
        vis = self.visibility_targets(targets, part["probs"])
        student = part["student"]
        losses = {"visibility": focal_loss(part["vis_logits"], vis, check=False),
                  "triplet_parts": part_triplet_loss(student[:, 2:], pids, self.triplet_margin, vis, check=False),
                  "diversity": diversity_loss(student[:, 2:], _part_pairs(self.flip_pairs)),
                  "id_foreground": identity_loss(self.foreground_neck(part["foreground"])[1], pids,
                                                 self.label_smoothing, check=False)}
        if targets is not None:
            losses["parsing"] = parsing_loss(part["part_logits"], targets, self.parsing_smoothing)
        passes = [("student", student, part["foreground"])]
        if "teacher" in part:
            passes.append(("teacher", part["teacher"], part["teacher_foreground"]))
        # granularity weights: decoder CLS and foreground always, parts where visible
        gran_w = torch.cat([torch.ones(B, 1, device=vis.device), vis, torch.ones(B, 1, device=vis.device)], 1)
        id_parts, id_gran, gran = [], [], {}
        for name, out, fg in passes:  # the student's statistics alone are tracked: inference normalises its parts
            logits = self.parts_neck(out[:, 2:].flatten(1), track=name == "student")[1]
            id_parts.append(identity_loss(logits, pids, self.label_smoothing, check=False))
            feats = torch.cat([out[:, :1], out[:, 2:], fg[:, None]], dim=1)  # [B, P + 2, D]
            _, logits = self.granularity_necks(feats)  # [P + 2, B, C]
            ce = F.cross_entropy(logits.flatten(0, 1).float(), pids.repeat(P + 2), reduction="none").view(P + 2, B)
            id_gran.append((ce.T * gran_w).sum() / gran_w.sum())
            gran[name] = (feats, logits)
        share = (1.0,) if len(passes) == 1 else (1 - self.teacher_id_share, self.teacher_id_share)
        losses["id_parts"] = sum(w * x for w, x in zip(share, id_parts, strict=True))
        losses["id_granularity"] = sum(w * x for w, x in zip(share, id_gran, strict=True))
        if self.amgd is not None:
            (s_feat, s_logit), (t_feat, t_logit) = gran["student"], gran["teacher"]
            losses["amgd"] = self.amgd(s_feat, t_feat.detach(), s_logit, t_logit.detach()).loss
        if self.part_reconstructor is not None:
            losses.update(self.part_recon_losses(part, vis, pids))
        return losses

    def part_recon_losses(self, part: dict, vis: torch.Tensor, pids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rebuild the invisible parts and a random share of the visible ones; the visible ones hidden have a target
        (the teacher's part feature, or the student's without a teacher, detached). With `recon_detach` the
        reconstructor reads the student's parts and foreground detached: its losses reach only the reconstructor
        and the neck that scores the rebuilt parts (the shared one's BN scale included), not the encoder or the
        part decoder."""
        student, foreground = part["student"][:, 2:], part["foreground"]
        if self.recon_detach:
            student, foreground = student.detach(), foreground.detach()
        visible = vis > 0.5
        drop = visible & (torch.rand(vis.shape, device=vis.device) < self.recon_hide_prob)
        rebuilt = self.part_reconstructor(foreground, student, ~visible | drop)
        target = part.get("teacher", part["student"])[:, 2:].detach()
        if self.recon_neck is not None:
            logits = self.recon_neck(rebuilt.flatten(1))[1]
        else:  # the student's classifier; the rebuilt parts are not what inference normalises: untracked
            logits = self.parts_neck(rebuilt.flatten(1), track=False)[1]
        return {"id_recon": identity_loss(logits, pids, self.label_smoothing, check=False),
                "part_reconstruction": feature_reconstruction_loss(rebuilt, target, drop.float(), check=False)}

    # -- forward ---------------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Training: (images, pids, camids=None, masks=None, occlusion=None); eval: (images, camids=None,
        global_only=False). See the module docstring for what comes back."""
        if self.training:
            return self.forward_train(images, *args, **kwargs)
        return self.forward_eval(images, *args, **kwargs)

    def forward_train(self, images: torch.Tensor, pids: torch.Tensor, camids: torch.Tensor | None = None,
                      masks: torch.Tensor | None = None, occlusion: torch.Tensor | None = None
                      ) -> dict[str, torch.Tensor]:
        if self.num_classes == 0:
            raise ValueError("this model is a headless feature extractor (num_classes=0): it has no identity loss "
                             "to train; call model.reset_classifier(num_classes) first")
        self.check_inputs(images, pids, camids, masks, occlusion)
        text_keys = self.text_keys()
        patches = self.backbone.patch_tokens(images)  # [B, N, D], shared by the full and the masked view
        M = self.forward_encoder(images, camids, text_keys, patches=patches)
        G = self.forward_global(M)
        part = self.forward_parts(M, G, self.switches["teacher_student"]) if self.switches["parts"] else None
        targets = self.token_targets(masks) if part is not None else None
        g, part = self.center(G[:, 0], part, camids)
        losses = self.forward_losses(g, pids, part, targets)
        if self.switches["hpr"]:
            losses.update(self.forward_masked_view(images, camids, occlusion, text_keys, patches, g))
        out = {"loss": sum(self.loss_weights[k] * v for k, v in losses.items())}
        out.update({f"loss_{k}": v for k, v in losses.items()})
        if self.fusion is not None:
            out["fusion_gate"] = self.fusion.gates().mean()
        return out

    def forward_eval(self, images: torch.Tensor, camids: torch.Tensor | None = None, global_only: bool = False
                     ) -> dict[str, torch.Tensor]:
        self.check_inputs(images, camids=camids)
        M = self.forward_encoder(images, camids, self.text_keys())
        G = self.forward_global(M)
        part = self.forward_parts(M, G, teacher=False) if self.switches["parts"] and not global_only else None
        g, part = self.center(G[:, 0], part, camids)
        g = self.global_neck.bn(g)
        if global_only:
            return {"features": F.normalize(g, dim=-1)}
        if part is None:
            return {"features": F.normalize(g, dim=-1)[:, None], "visibility": g.new_ones(g.shape[0], 1)}
        B, P, D = images.shape[0], self.num_parts, g.shape[-1]
        student, visible = part["student"][:, 2:], torch.sigmoid(part["vis_logits"]) > 0.5
        if self.recon_fill:  # the hidden parts rebuilt from the foreground and the visible ones, and counted
            rebuilt = self.part_reconstructor(part["foreground"], student, ~visible)
            student, visible = torch.where(visible[..., None], student, rebuilt), torch.ones_like(visible)
        parts = self.parts_neck.bn(student.flatten(1)).view(B, P, D)
        features = F.normalize(torch.cat([g[:, None], parts], dim=1), dim=-1)
        return {"features": features, "visibility": torch.cat([g.new_ones(B, 1), visible.to(g.dtype)], dim=1)}

    @torch.no_grad()
    def part_maps(self, images: torch.Tensor, camids: torch.Tensor | None = None) -> torch.Tensor:
        """Where the model sees each part (for pictures; eval mode only): the pixel-to-part classifier's (parsing
        head's) probabilities on the patch grid, images [B, 3, H, W] -> [B, P, h, w] with (h, w) =
        backbone.grid_size; the background's share of a token is 1 minus the sum over P. The same encoder pass as
        `forward_eval`: no training branch, no random draw."""
        if not self.switches["parts"]:
            raise ValueError("this model has no part branch (parts=False): it has no part maps")
        if self.training:
            raise RuntimeError("part_maps is an eval-mode method: call model.eval() first")
        self.check_inputs(images, camids=camids)
        G = self.forward_global(self.forward_encoder(images, camids, self.text_keys()))
        probs = self.part_classifier(G[:, 1:]).softmax(-1)[..., 1:]  # [B, N, P]
        return probs.transpose(1, 2).reshape(images.shape[0], self.num_parts, *self.backbone.grid_size)

    # -- as a timm model ---------------------------------------------------------------------------------------------
    def forward_features(self, images: torch.Tensor, camids: torch.Tensor | None = None) -> torch.Tensor:
        """The global branch's tokens G [B, 1 + N, D] (normalised; G[:, 0] is the global feature before the neck)."""
        self.check_inputs(images, camids=camids)
        return self.forward_global(self.forward_encoder(images, camids, self.text_keys()))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, camids: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """x: `forward_features`' tokens [B, 1 + N, D] -> the identity logits [B, C], or with `pre_logits` the
        inference feature [B, D] (camera-centred when on, through the BNNeck's BN; not L2-normalised). A
        headless model (num_classes=0) returns the feature either way. The camera means are read, not moved."""
        g = x[:, 0]
        if self.camera_centering is not None:
            if camids is not None:
                check_ids(camids, g.shape[0], "camids")
                check_ranges(None, 0, camids, self.num_cameras)
            g = self.camera_centering(g[:, None], camids, update=False, slots=slice(0, 1), check=False)[:, 0]
        feat = self.global_neck.bn(g)
        return feat if pre_logits else self.global_neck.classifier(feat)

    def get_classifier(self) -> nn.Module:
        return self.global_neck.classifier

    def reset_classifier(self, num_classes: int) -> None:
        """New identity classifiers (every BNNeck's; their BN kept) and identity prompts for `num_classes`
        identities (0: headless). The text bank is emptied: stage 1 should run again for the new identities."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        for neck in (self.global_neck, getattr(self, "parts_neck", None), getattr(self, "foreground_neck", None),
                     getattr(self, "granularity_necks", None), self.recon_neck):
            if neck is not None:
                neck.reset_classifier(num_classes)
        if self.text is not None:
            self.text.reset_identities(num_classes)

    def set_train_cameras(self, cameras: Iterable[int]) -> None:
        """Mark which camera ids training sees (the others, and unknown ones, get the seen cameras' mean SIE
        vector at test time; docs/model.md, "Cameras"). No-op without cameras."""
        if self.cameras_seen is None:
            return
        cams = sorted({int(c) for c in cameras})
        if any(c < 0 or c >= self.num_cameras for c in cams):
            raise ValueError(f"training cameras must lie in [0, {self.num_cameras}), got {cams}")
        self.cameras_seen.zero_()
        self.cameras_seen[cams] = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        key = prefix + "cameras_seen"
        if self.cameras_seen is not None and key not in state_dict:  # checkpoints from before `cameras_seen`
            state_dict[key] = torch.ones_like(self.cameras_seen)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- input validation ------------------------------------------------------------------------------------------
    def check_inputs(self, images: torch.Tensor, pids: torch.Tensor | None = None, camids: torch.Tensor | None = None,
                     masks: torch.Tensor | None = None, occlusion: torch.Tensor | None = None) -> None:
        """The model's entry check (amfor/models/inputs.py), before anything runs: images [B, 3, H, W] floating,
        pids [B] in [0, num_classes), camids [B] in [-1, num_cameras) or None (ignored without cameras), masks [B, H, W]
        with part labels in [-1, 1 + P) and occlusion [B, H, W]. Shapes first, then one host sync for the value
        ranges."""
        check_images(images, self.backbone.in_chans, self.input_size)
        B = images.shape[0]
        if pids is not None:
            check_ids(pids, B, "pids")
        if camids is not None and self.num_cameras > 0:
            check_ids(camids, B, "camids")
        check_maps(B, self.input_size, masks=masks, occlusion=occlusion)
        check_ranges(pids, self.num_classes, camids, self.num_cameras, masks, self.num_parts + 1)
