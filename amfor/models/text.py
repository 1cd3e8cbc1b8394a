"""Text branch (docs/spec.md section 2): open_clip's text tower, the CLIP-ReID prompt learner, the frozen text bank.

The prompt is "A photo of a X X X X person." where the four X token embeddings are learned per identity. The text
tower is open_clip's `TextTransformer` (built from a config; weights from a local CLIP file when given, read by
open_clip's own loaders, otherwise random) and stays frozen: only the prompts and `text_to_visual` train. CLIP's
text transformer is causal and pools at the end-of-text token, so the tokens after it cannot change the pooled
feature: the prompt is run on its own length (12 tokens) instead of the 77-token context, the same result for 1/6
of the work.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from amfor.models.weights import is_torchscript

log = logging.getLogger(__name__)

PROMPT = "A photo of a X X X X person."
NUM_CONTEXT = 4  # learnable tokens per identity: the four X


def read_clip_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], bool]:
    """(state dict, from OpenAI's archive) of a local CLIP file, through open_clip's loaders.

    A TorchScript archive (OpenAI's ViT-B-16.pt) goes through `open_clip.load_openai_model` (torch.jit.load, then
    `build_model_from_openai_state_dict`, fp32), anything else through open_clip's `load_state_dict` (.safetensors
    or a torch file read with weights_only; `state_dict` and `module.` unwrapped). Raises FileNotFoundError for a
    missing file and ValueError, naming the file, for one open_clip cannot read.
    """
    from open_clip.factory import load_state_dict  # here: amfor.models imports without open_clip (issue 25)
    from open_clip.openai import load_openai_model

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP weights file not found: {path}")
    openai = is_torchscript(path)
    try:
        if openai:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated; OpenAI ships only these
                return load_openai_model(str(path), precision="fp32", device="cpu").state_dict(), True
        state = load_state_dict(str(path), device="cpu", weights_only=True)
    except Exception as err:  # unpickling, zip, safetensors header, a TorchScript archive that is no OpenAI CLIP
        kind = "an OpenAI CLIP TorchScript archive" if openai else "a CLIP checkpoint"
        raise ValueError(f"{path} is not readable as {kind} ({type(err).__name__}: {str(err)[:200]})") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds no CLIP state dict (found {type(state).__name__})")
    return state, False


class TextEncoder(nn.Module):
    """open_clip `TextTransformer` run on token embeddings rather than token ids (frozen by the caller).

    width/heads/layers/output_dim: the tower's shape (CLIP ViT-B/16: 512/8/12/512); context_length: its
    positional-embedding length (77 for CLIP checkpoints); quick_gelu: the activation OpenAI trained CLIP with
    (set by `load_clip` for OpenAI's archives; open_clip's own checkpoints use GELU, the default).
    """

    def __init__(self, width: int = 512, heads: int = 8, layers: int = 12, output_dim: int = 512,
                 context_length: int = 77, vocab_size: int = 49408, quick_gelu: bool = False) -> None:
        super().__init__()
        self.shape = dict(context_length=context_length, vocab_size=vocab_size, width=width, heads=heads,
                          layers=layers, output_dim=output_dim)
        self.quick_gelu = quick_gelu
        self.tower = self._build_tower()
        self.width, self.output_dim = width, output_dim

    def _build_tower(self) -> nn.Module:
        from open_clip.transformer import QuickGELU, TextTransformer  # here: amfor.models imports without open_clip

        return TextTransformer(**self.shape, act_layer=QuickGELU if self.quick_gelu else nn.GELU)

    def token_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [S] long -> [S, width]."""
        return self.tower.token_embedding(tokens)

    def forward(self, embeds: torch.Tensor, eot: int) -> torch.Tensor:
        """embeds: [B, S, width] prompt token embeddings (S <= context), eot: position of the end-of-text token
        -> pooled, projected text features [B, output_dim]."""
        S = embeds.shape[1]
        x = embeds + self.tower.positional_embedding[:S].to(embeds.dtype)
        mask = self.tower.attn_mask[:S, :S].to(embeds.dtype) if self.tower.attn_mask is not None else None
        x = self.tower.transformer(x, attn_mask=mask)
        x = self.tower.ln_final(x[:, eot])
        proj = self.tower.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def load_clip(self, path: str | Path) -> list[str]:
        """Load the text tower from a local CLIP file: OpenAI's TorchScript archive (ViT-B-16.pt) or an open_clip
        checkpoint (.pt/.pth/.bin/.safetensors), read by open_clip (`read_clip_state_dict`).

        The text keys are found as open_clip finds them (`convert_to_custom_text_state_dict`: CLIP's top-level
        token_embedding / transformer / ln_final / ... or `text.*`); the image tower's keys are ignored. An OpenAI
        archive switches the tower to QuickGELU, as open_clip builds OpenAI models. Returns the missing keys;
        raises, naming the file, for a file without text-tower keys or with a tower of another shape.
        """
        from open_clip.model import convert_to_custom_text_state_dict

        state, openai = read_clip_state_dict(path)
        own = self.tower.state_dict()
        text = {k[len("text."):]: v for k, v in convert_to_custom_text_state_dict(state).items()
                if k.startswith("text.")}
        layers = {int(k.split(".")[2]) for k in text if k.startswith("transformer.resblocks.")}
        if layers and max(layers) + 1 != self.shape["layers"]:
            raise ValueError(f"{path}: its text tower has {max(layers) + 1} layers, this model's "
                             f"{self.shape['layers']} (text_layers)")
        text = {k: v for k, v in text.items() if k in own}
        if not text:
            raise ValueError(f"{path}: no CLIP text-tower key (token_embedding, transformer.resblocks.*, ...) found")
        wrong = [f"{k} {tuple(v.shape)} (this tower: {tuple(own[k].shape)})" for k, v in text.items()
                 if v.shape != own[k].shape]
        if wrong:
            raise ValueError(f"{path}: its text tower has another shape than this model's (text width, layers, "
                             f"output dim, context length): {'; '.join(wrong[:3])}")
        if openai and not self.quick_gelu:
            self.quick_gelu = True  # OpenAI trained CLIP with QuickGELU (open_clip's load_openai_model does the same)
            old, ref = self.tower, self.tower.positional_embedding
            self.tower = self._build_tower().to(ref.device, ref.dtype).requires_grad_(ref.requires_grad)
            self.tower.train(old.training)
        missing, _ = self.tower.load_state_dict(text, strict=False)
        log.info("loaded CLIP text tower from %s (%d tensors, %d missing, %s)", path, len(text), len(missing),
                 "QuickGELU" if self.quick_gelu else "GELU")
        return list(missing)


class PromptLearner(nn.Module):
    """CLIP-ReID prompts: fixed prefix/suffix token embeddings around NUM_CONTEXT learned tokens per identity.

    forward(pids [B]) -> prompt embeddings [B, S, width] with S = the prompt's length up to end-of-text.
    """

    def __init__(self, encoder: TextEncoder, num_classes: int, prompt: str = PROMPT, ctx_std: float = 0.02) -> None:
        from open_clip.tokenizer import SimpleTokenizer  # with ftfy: loaded only when a text tower is built

        super().__init__()
        tokens = SimpleTokenizer()(prompt)[0]
        self.eot = int(tokens.argmax())  # the end-of-text id is the largest in CLIP's vocabulary
        tokens = tokens[: self.eot + 1]
        x_id = SimpleTokenizer().encode("X")[0]
        first = int((tokens == x_id).nonzero()[0])
        if not bool((tokens[first:first + NUM_CONTEXT] == x_id).all()):
            raise ValueError(f"prompt {prompt!r} must hold {NUM_CONTEXT} consecutive X tokens")
        with torch.no_grad():
            embed = encoder.token_embedding(tokens)
        self.register_buffer("prefix", embed[:first].clone(), persistent=False)  # [S0, W]
        self.register_buffer("suffix", embed[first + NUM_CONTEXT:].clone(), persistent=False)  # [S1, W]
        self.context = nn.Parameter(torch.randn(num_classes, NUM_CONTEXT, encoder.width) * ctx_std)
        self.num_classes = num_classes

    def forward(self, pids: torch.Tensor) -> torch.Tensor:
        B = pids.shape[0]
        ctx = self.context[pids]
        return torch.cat([self.prefix.expand(B, -1, -1), ctx.to(self.prefix.dtype), self.suffix.expand(B, -1, -1)], 1)


class TextBranch(nn.Module):
    """Frozen text tower + per-identity prompts + `text_to_visual`, and the frozen bank used at stage 2 and test.

    bank: [C, output_dim] text features of every identity, a buffer (saved in checkpoints), filled by
    `build_bank()` after stage 1; `visual_bank()` maps it to the visual width for the AMFF-Encoder.
    """

    def __init__(self, num_classes: int, visual_dim: int, width: int = 512, heads: int = 8, layers: int = 12,
                 output_dim: int = 512, context_length: int = 77, clip_weights: str | None = None) -> None:
        super().__init__()
        self.encoder = TextEncoder(width, heads, layers, output_dim, context_length)
        if clip_weights:
            self.encoder.load_clip(clip_weights)
        self.encoder.requires_grad_(False)
        self.register_buffer("bank_ready", torch.zeros((), dtype=torch.bool))  # saved with the bank
        self._identities(num_classes)
        self.text_to_visual = nn.Linear(output_dim, visual_dim)

    def _identities(self, num_classes: int) -> None:
        """Prompts for `num_classes` identities and an empty bank [num_classes, output_dim] (not ready)."""
        device = self.bank_ready.device
        self.prompts = PromptLearner(self.encoder, num_classes).to(device)
        self.register_buffer("bank", torch.zeros(num_classes, self.encoder.output_dim, device=device))
        self.bank_ready.fill_(False)
        self.ready = False  # the same as a Python bool, so forward never branches on a tensor (export, compile)

    def reset_identities(self, num_classes: int) -> None:
        """Fresh prompts for `num_classes` identities and an empty bank, `text_to_visual` trainable again: stage 1
        is to run again. 0 identities: no prompt and an empty bank (a headless model reads no text)."""
        self._identities(num_classes)
        self.text_to_visual.requires_grad_(True)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.ready = bool(self.bank_ready)

    def train(self, mode: bool = True) -> TextBranch:
        super().train(mode)
        self.encoder.eval()  # frozen: no dropout, whatever the model's mode
        return self

    def text_features(self, pids: torch.Tensor) -> torch.Tensor:
        """pids [B] -> text features [B, output_dim] through the learned prompts (differentiable in the prompts)."""
        return self.encoder(self.prompts(pids), self.prompts.eot)

    @torch.no_grad()
    def build_bank(self, chunk: int = 256) -> None:
        """Fill the frozen bank with every identity's text feature (after stage 1)."""
        C = self.prompts.num_classes
        pids = torch.arange(C, device=self.bank.device)
        if C > 0:  # no identity (a headless model): an empty bank
            self.bank.copy_(torch.cat([self.text_features(pids[s:s + chunk]) for s in range(0, C, chunk)]))
        self.bank_ready.fill_(True)
        self.ready = True

    def visual_bank(self, mode: str = "all") -> torch.Tensor:
        """The bank in visual space: [C, visual_dim] ("all") or [1, visual_dim] ("mean")."""
        bank = self.bank.mean(0, keepdim=True) if mode == "mean" else self.bank
        return self.text_to_visual(bank)


def contrastive_losses(image_feats: torch.Tensor, text_feats: torch.Tensor, labels: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP-ReID stage-1 losses over the identities of a batch (L2-normalised features, logits x scale).

    image_feats: [B, D]; text_feats: [U, D], one per distinct identity of the batch; labels: [B] in [0, U), the
    row of text_feats that is each image's identity. i2t: cross-entropy of each image over the U texts; t2i:
    for each text, the mean negative log-probability of its identity's images among all B images (supervised
    contrastive). Returns (loss_i2t, loss_t2i).
    """
    img = F.normalize(image_feats.float(), dim=1)
    txt = F.normalize(text_feats.float(), dim=1)
    logits = scale * img @ txt.T  # [B, U]
    loss_i2t = F.cross_entropy(logits, labels)
    positive = (labels[None, :] == torch.arange(txt.shape[0], device=labels.device)[:, None]).float()  # [U, B]
    log_prob = logits.T.log_softmax(dim=1)
    loss_t2i = -((log_prob * positive).sum(1) / positive.sum(1).clamp(min=1)).mean()
    return loss_i2t, loss_t2i
