"""Checkpoint files in their real formats, built inside the tests (nothing is downloaded)."""

import torch
from torch import nn


class _Holder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def save_torchscript(state: dict[str, torch.Tensor], path) -> None:
    """The tensors as a TorchScript archive (a scripted module saved with torch.jit.save), as OpenAI ships CLIP."""
    root = _Holder()
    for key, value in state.items():
        *parents, name = key.split(".")
        module = root
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, _Holder())
            module = getattr(module, part)
        module.register_buffer(name, value)
    torch.jit.save(torch.jit.script(root), str(path))
