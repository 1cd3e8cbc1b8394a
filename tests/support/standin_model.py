"""A small stand-in that follows the AMFOR model contract exactly, so the engine is tested on the contract alone.

`model.name: standin_model:create_standin` (this folder on PYTHONPATH). Knobs for the tests: `dropout`
(exercises the RNG states of a resume), `bn` (BatchNorm, which DDP does not synchronise on CPU), `nan_at`
(the loss term `nan_term` becomes NaN on that training forward), `sleep` (seconds per training forward, so a
test can kill a run mid-epoch).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn


class StandIn(nn.Module):
    def __init__(self, num_classes: int, num_cameras: int = 0, pretrained=None, dim: int = 16, has_text: bool = True,
                 dropout: float = 0.0, bn: bool = False, nan_at: int = 0, nan_term: str = "loss_ce",
                 sleep: float = 0.0, input_size=(32, 16)) -> None:
        super().__init__()
        self.num_classes, self.input_size, self.has_text = num_classes, tuple(input_size), has_text
        self.flip_pairs = ((1, 2),)  # features: [global, left part, right part]
        self.nan_at, self.nan_term, self.sleep = nan_at, nan_term, sleep
        self.embed = nn.Conv2d(3, dim, 8, 8)
        self.pos = nn.Parameter(torch.zeros(1, dim, self.input_size[0] // 8, self.input_size[1] // 8))
        self.cam = nn.Embedding(max(1, num_cameras), dim)
        self.neck = nn.BatchNorm1d(dim) if bn else nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, num_classes)
        self.vis = nn.Linear(dim, 1)
        self.prompts = nn.Parameter(0.1 * torch.randn(num_classes, dim))
        self.register_buffer("text_bank", torch.zeros(num_classes, dim))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def no_weight_decay(self) -> set[str]:
        return {"pos", "cam.weight"}

    def tokens(self, images: torch.Tensor, camids: torch.Tensor | None) -> torch.Tensor:
        """Patch features [B, D, h, w] with the camera's embedding added; none for an unknown camera (camids None
        or -1, as the contract says)."""
        assert images.shape[-2:] == self.input_size, f"loader size {images.shape[-2:]} != input_size"
        x = self.embed(images) + self.pos
        if camids is None:
            return x
        cam = self.cam(camids.clamp(0, self.cam.num_embeddings - 1)) * (camids >= 0)[:, None]
        return x + cam[:, :, None, None]

    def parts(self, images, camids=None) -> torch.Tensor:
        """[B, 3, D]: global mean, then the left and right halves (swapped by a horizontal flip)."""
        x = self.tokens(images, camids)
        half = x.shape[-1] // 2
        return torch.stack([x.mean((2, 3)), x[..., :half].mean((2, 3)), x[..., half:].mean((2, 3))], 1)

    def stage1_features(self, images, camids=None) -> torch.Tensor:
        return self.parts(images, camids)[:, 0]

    def stage1_parameters(self):
        yield self.prompts

    def stage1_loss(self, feats, pids) -> dict:
        i2t = F.cross_entropy(F.normalize(feats, dim=1) @ F.normalize(self.prompts, dim=1).T / 0.1, pids)
        t2i = (1 - F.cosine_similarity(self.prompts[pids], feats, dim=1)).mean()
        return {"loss": i2t + t2i, "loss_i2t": i2t, "loss_t2i": t2i}

    def finish_stage1(self) -> None:
        """As AMFOR's: the bank from the prompts, and what stage 1 trained frozen."""
        if self.has_text:
            self.text_bank.copy_(self.prompts.detach())
            self.prompts.requires_grad_(False)

    def forward(self, images, *args, **kwargs) -> dict:
        """As AMFOR's: training (images, pids, camids=None, masks=None, occlusion=None); eval (images, camids=None,
        global_only=False)."""
        if self.training:
            return self.forward_train(images, *args, **kwargs)
        return self.forward_eval(images, *args, **kwargs)

    def forward_eval(self, images, camids=None, global_only: bool = False) -> dict:
        f = self.parts(images, camids)
        if global_only:
            return {"features": f[:, 0]}
        vis = torch.sigmoid(self.vis(f)).squeeze(-1)
        return {"features": f, "visibility": torch.cat([torch.ones_like(vis[:, :1]), vis[:, 1:]], 1)}

    def forward_train(self, images, pids, camids=None, masks=None, occlusion=None) -> dict:
        if masks is not None:
            assert masks.shape == (images.shape[0], *self.input_size) and masks.dtype == torch.long
        assert occlusion is not None and occlusion.shape == (images.shape[0], *self.input_size)
        self.calls += 1
        if self.sleep:
            time.sleep(self.sleep)
        f = self.drop(self.parts(images, camids))
        g = self.neck(f[:, 0])
        losses = {"loss_ce": F.cross_entropy(self.classifier(g), pids)}
        losses["loss_part"] = F.cross_entropy(self.classifier(f[:, 1] + f[:, 2]), pids)
        if self.has_text:
            losses["loss_text"] = F.cross_entropy(F.normalize(g, dim=1) @ F.normalize(self.text_bank, dim=1).T / 0.1,
                                                  pids)
        if self.nan_at and int(self.calls) == self.nan_at:
            losses[self.nan_term] = losses[self.nan_term] * float("nan")
        acc = (self.classifier(g).argmax(1) == pids).float().mean().detach()
        return {"loss": sum(losses.values()), **{k: v.detach() for k, v in losses.items()}, "acc": acc}


def create_standin(num_classes: int, num_cameras: int = 0, pretrained=None, **kwargs) -> StandIn:
    return StandIn(num_classes, num_cameras, pretrained, **kwargs)
