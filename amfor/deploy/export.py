"""Export of the inference model: ONNX (torch.onnx, dynamo exporter) or a torch.export program (.pt2).

The graph is traced with `amfor.ops.use_backend("torch")`, so every amfor op is its plain-PyTorch
reference: no custom op ends up in the graph, and any runtime can execute it.

Inputs:  images  float32 [B, 3, H, W], (x / 255 - mean) / std with the model's `pretrained_cfg` (H, W, mean, std)
         camids  int64   [B]          0-based camera ids, -1 for an unknown camera (absent with camids=False:
                                      every camera unknown, as `model(images)`; docs/model.md "Cameras")
Outputs: features   float32 [B, 1+P, D]  global feature then P part features (or [B, D] with global_only)
         visibility float32 [B, 1+P]     part visibility in [0, 1] (absent with global_only)
B is dynamic. A JSON file next to the export records these names and shapes and the preprocessing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data import resolve_data_config
from ..ops import use_backend

FORMATS = ("onnx", "torch-export", "weights")  # weights: the slim safetensors file of deploy/weights.py


class InferenceModel(nn.Module):
    """model(images, camids) in eval mode as a tuple of tensors (what exporters take); with `camids=False`,
    model(images): one input, every camera unknown."""

    def __init__(self, model: nn.Module, global_only: bool = False, camids: bool = True) -> None:
        super().__init__()
        self.model, self.global_only, self.camids = model.eval(), global_only, camids

    def forward(self, images: torch.Tensor, camids: torch.Tensor | None = None):
        if self.global_only:
            return self.model(images, camids, global_only=True)["features"]
        out = self.model(images, camids)
        return out["features"], out["visibility"]


def example_inputs(model: nn.Module, batch: int = 2, camids: bool = True) -> tuple[torch.Tensor, ...]:
    """(images, camids) or (images,): random images at the model's size, camera 0."""
    h, w = model.input_size
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, h, w, generator=gen)
    return (images, torch.zeros(batch, dtype=torch.long)) if camids else (images,)


def io_spec(model: nn.Module, wrapper: InferenceModel) -> dict:
    """Names and shapes of the exported graph's inputs and outputs (B dynamic), measured on an example, and the
    preprocessing the images need (the model's `pretrained_cfg`)."""
    with torch.no_grad(), use_backend("torch"):
        out = wrapper(*example_inputs(model, camids=wrapper.camids))
    outs = (out,) if torch.is_tensor(out) else out
    names = ["features"] if torch.is_tensor(out) else ["features", "visibility"]
    h, w = model.input_size
    data = resolve_data_config(model)
    mean, std = list(data["mean"]), list(data["std"])
    outputs = {n: {"dtype": "float32", "shape": ["B", *o.shape[1:]]} for n, o in zip(names, outs, strict=True)}
    inputs = {"images": {"dtype": "float32", "shape": ["B", 3, h, w], "normalisation": "(x/255 - mean) / std",
                         "mean": mean, "std": std, "interpolation": data["interpolation"]}}
    if wrapper.camids:
        inputs["camids"] = {"dtype": "int64", "shape": ["B"], "unknown": -1}
    return {"inputs": inputs, "outputs": outputs}


def custom_ops_in(program: torch.export.ExportedProgram) -> list[str]:
    """Targets of graph nodes outside the aten/prim namespaces (e.g. torch.ops.amfor.*)."""
    found = set()
    for node in program.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            if node.target.namespace not in ("aten", "prims"):
                found.add(str(node.target))
    return sorted(found)


def dynamic_batch(wrapper: InferenceModel) -> dict:
    """The batch dimension of every input is dynamic."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    return {"images": {0: batch}, **({"camids": {0: batch}} if wrapper.camids else {})}


def export_torch(wrapper: InferenceModel, example: tuple, path: Path) -> torch.export.ExportedProgram:
    with torch.no_grad(), use_backend("torch"):
        program = torch.export.export(wrapper, example, dynamic_shapes=dynamic_batch(wrapper))
    custom = custom_ops_in(program)
    if custom:
        raise RuntimeError(f"the exported graph holds custom ops {custom}; the reference backend should avoid them")
    torch.export.save(program, str(path))
    return program


def export_onnx(wrapper: InferenceModel, example: tuple, path: Path, output_names: list[str],
                opset: int | None = None) -> None:
    with torch.no_grad(), use_backend("torch"):
        torch.onnx.export(wrapper, example, str(path), dynamo=True, input_names=list(dynamic_batch(wrapper)),
                          output_names=output_names, dynamic_shapes=dynamic_batch(wrapper),
                          opset_version=opset, external_data=False, verbose=False)
    import onnx

    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    domains = {node.domain for node in graph.graph.node} - {"", "ai.onnx"}
    if domains:
        raise RuntimeError(f"the ONNX graph uses non-standard operator domains {sorted(domains)}")


def parity(fmt: str, path: Path, wrapper: InferenceModel, batch: int = 3) -> float | None:
    """Max abs difference between the export and the eager model on a batch of another size (None: no runtime)."""
    inputs = example_inputs(wrapper.model, batch, wrapper.camids)
    with torch.no_grad(), use_backend("torch"):
        ref = wrapper(*inputs)
    ref = [ref] if torch.is_tensor(ref) else list(ref)
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            return None
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {name: t.numpy() for name, t in zip(dynamic_batch(wrapper), inputs, strict=True)})
    else:
        module = torch.export.load(str(path)).module()
        with torch.no_grad():
            got = module(*inputs)
        got = [got] if torch.is_tensor(got) else list(got)
        got = [g.numpy() for g in got]
    return max(float(np.abs(r.numpy() - g).max()) for r, g in zip(ref, got, strict=True))


def export(model: nn.Module, fmt: str, path: str | Path, global_only: bool = False, opset: int | None = None,
           check: bool = True, atol: float = 1e-4, camids: bool = True) -> dict:
    """Export `model` (eval mode, CPU) to `path`; returns the I/O spec with the parity error, also saved as JSON.
    camids=False: a graph with the images as its only input (every camera unknown)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "weights":
        raise ValueError("the weights file needs the model's name and kwargs: amfor.deploy.weights.save_weights")
    model = model.cpu().eval()
    wrapper = InferenceModel(model, global_only, camids).eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = {"format": fmt, "input_size": list(model.input_size), **io_spec(model, wrapper)}
    example = example_inputs(model, camids=camids)
    if fmt == "onnx":
        export_onnx(wrapper, example, path, list(spec["outputs"]), opset)
    else:
        export_torch(wrapper, example, path)
    if check:
        err = parity(fmt, path, wrapper)
        spec["parity_max_abs_error"] = err
        if err is not None and err > atol:
            raise RuntimeError(f"{fmt} export differs from the eager model by {err:.2e} (> {atol:.0e})")
    Path(str(path) + ".json").write_text(json.dumps(spec, indent=1))
    return spec
