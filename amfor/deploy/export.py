"""Export of the inference model: ONNX (torch.onnx, dynamo exporter) or a torch.export program (.pt2).

The graph is traced with `amfor.ops.use_backend("torch")`, so every amfor op is its plain-PyTorch
reference: no custom op ends up in the graph, and any runtime can execute it.

Inputs:  images  float32 [B, 3, H, W], (x / 255 - mean) / std with the model's `pretrained_cfg` (H, W, mean, std);
                 with input_norm="imagenet", normalised with ImageNet's mean and std instead, as trackers feed a
                 ReID model (BoxMOT, torchreid): the graph turns that into the model's normalisation;
                 with input_dtype="uint8": uint8 [B, 3, H, W] RGB in 0..255, x / 255, mean and std inside the graph
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
INPUT_DTYPES = ("float32", "uint8")
INPUT_NORMS = ("model", "imagenet")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def check_input_options(input_dtype: str, input_norm: str) -> None:
    """ValueError naming the problem for an input dtype or normalisation the export does not offer."""
    if input_dtype not in INPUT_DTYPES:
        raise ValueError(f"input dtype must be one of {INPUT_DTYPES}, got {input_dtype!r}")
    if input_norm not in INPUT_NORMS:
        raise ValueError(f"input normalisation must be one of {INPUT_NORMS}, got {input_norm!r}")
    if input_dtype == "uint8" and input_norm != "model":
        raise ValueError(f"input normalisation {input_norm!r} is for float32 input; uint8 input is normalised inside "
                         "the graph with the model's own mean and std")


class InputNormalization(nn.Module):
    """What the graph does to its `images` input before the model: nothing (float32, the model's normalisation),
    x / 255 then (x - mean) / std (uint8 RGB), or ImageNet's normalisation undone and the model's applied
    (float32 normalised with ImageNet's mean and std). images [B, 3, H, W] -> float32 [B, 3, H, W]."""

    def __init__(self, mean, std, input_dtype: str = "float32", input_norm: str = "model") -> None:
        super().__init__()
        check_input_options(input_dtype, input_norm)
        self.input_dtype, self.input_norm = input_dtype, input_norm
        for name, values in (("mean", mean), ("std", std), ("input_mean", IMAGENET_MEAN), ("input_std", IMAGENET_STD)):
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.input_dtype == "uint8":
            return (images.to(torch.float32) / 255.0 - self.mean) / self.std
        if self.input_norm == "imagenet":
            return (images * self.input_std + self.input_mean - self.mean) / self.std
        return images


class InferenceModel(nn.Module):
    """model(images, camids) in eval mode as a tuple of tensors (what exporters take); with `camids=False`,
    model(images): one input, every camera unknown. `input_dtype` / `input_norm`: what `images` holds
    (`InputNormalization`; the default is the model's own input, and the graph then has no step for it)."""

    def __init__(self, model: nn.Module, global_only: bool = False, camids: bool = True, input_dtype: str = "float32",
                 input_norm: str = "model") -> None:
        super().__init__()
        self.model, self.global_only, self.camids = model.eval(), global_only, camids
        self.input_dtype, self.input_norm = input_dtype, input_norm
        data = resolve_data_config(model)
        own = input_dtype == "float32" and input_norm == "model"
        self.normalize = None if own else InputNormalization(data["mean"], data["std"], input_dtype, input_norm)

    def forward(self, images: torch.Tensor, camids: torch.Tensor | None = None):
        if self.normalize is not None:
            images = self.normalize(images)
        if self.global_only:
            return self.model(images, camids, global_only=True)["features"]
        out = self.model(images, camids)
        return out["features"], out["visibility"]


def example_inputs(model: nn.Module, batch: int = 2, camids: bool = True, input_dtype: str = "float32"
                   ) -> tuple[torch.Tensor, ...]:
    """(images, camids) or (images,): random images at the model's size (uint8 0..255 with input_dtype="uint8"),
    camera 0."""
    h, w = model.input_size
    gen = torch.Generator().manual_seed(0)
    if input_dtype == "uint8":
        images = torch.randint(0, 256, (batch, 3, h, w), generator=gen, dtype=torch.uint8)
    else:
        images = torch.randn(batch, 3, h, w, generator=gen)
    return (images, torch.zeros(batch, dtype=torch.long)) if camids else (images,)


def io_spec(model: nn.Module, wrapper: InferenceModel) -> dict:
    """Names and shapes of the exported graph's inputs and outputs (B dynamic), measured on an example, and the
    preprocessing the images need (the model's `pretrained_cfg`)."""
    with torch.no_grad(), use_backend("torch"):
        out = wrapper(*example_inputs(model, camids=wrapper.camids, input_dtype=wrapper.input_dtype))
    outs = (out,) if torch.is_tensor(out) else out
    names = ["features"] if torch.is_tensor(out) else ["features", "visibility"]
    h, w = model.input_size
    data = resolve_data_config(model)
    mean, std = list(data["mean"]), list(data["std"])
    outputs = {n: {"dtype": "float32", "shape": ["B", *o.shape[1:]]} for n, o in zip(names, outs, strict=True)}
    images = {"dtype": wrapper.input_dtype, "shape": ["B", 3, h, w], "channels": "RGB",
              "normalisation": "(x/255 - mean) / std", "mean": mean, "std": std,
              "interpolation": data["interpolation"]}
    if wrapper.input_dtype == "uint8":
        images["normalisation"] = "none: pixels 0..255; x/255, then (x - mean) / std inside the graph"
    elif wrapper.input_norm == "imagenet":
        images.update(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), model_mean=mean, model_std=std,
                      normalisation="(x/255 - mean) / std with ImageNet's mean and std; the graph turns it into "
                                    "the model's (model_mean, model_std)")
    inputs = {"images": images}
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
    inputs = example_inputs(wrapper.model, batch, wrapper.camids, wrapper.input_dtype)
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
           check: bool = True, atol: float = 1e-4, camids: bool = True, input_dtype: str = "float32",
           input_norm: str = "model") -> dict:
    """Export `model` (eval mode, CPU) to `path`; returns the I/O spec with the parity error, also saved as JSON.
    camids=False: a graph with the images as its only input (every camera unknown). input_dtype="uint8": the graph
    takes uint8 RGB images and normalises them itself; input_norm="imagenet": it takes float32 images normalised
    with ImageNet's mean and std (what trackers feed; module docstring)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "weights":
        raise ValueError("the weights file needs the model's name and kwargs: amfor.deploy.weights.save_weights")
    check_input_options(input_dtype, input_norm)
    model = model.cpu().eval()
    wrapper = InferenceModel(model, global_only, camids, input_dtype, input_norm).eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = {"format": fmt, "input_size": list(model.input_size), **io_spec(model, wrapper)}
    example = example_inputs(model, camids=camids, input_dtype=input_dtype)
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
