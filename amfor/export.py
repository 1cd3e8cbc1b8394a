"""`python -m amfor.export --checkpoint PATH --format onnx|torch-export` (or `amfor-export`): the inference model
for deployment.

`--format weights`: the slim, shareable safetensors file (the eval path's weights, the model's name, kwargs and
preprocessing; `amfor.deploy.weights`), loadable by `amfor.Extractor` and `amfor.deploy.load.load_model`.

Traced through the reference ops (no custom op in the graph); checked against onnxruntime (ONNX, when
installed: `pip install "amfor[export]"`) or torch.export.load (.pt2) on a batch of another size.
Inputs `images` [B, 3, H, W] float32 (normalised with the model's `pretrained_cfg` mean and std) and `camids`
[B] int64 (-1: unknown camera; `--no-camids`: no such input, every camera unknown); outputs `features`
[B, 1+P, D] and `visibility` [B, 1+P] (`--global-only`: `features` [B, D]). The shapes and the preprocessing
are written to <output>.json.

For trackers and services, one input and one output: `--no-camids --global-only`, with
`--input-dtype uint8` (images uint8 [B, 3, H, W] RGB 0..255; x/255 and the model's mean and std inside the graph)
or `--input-norm imagenet` (float32 images normalised with ImageNet's mean and std, as BoxMOT and torchreid feed
a ReID model; the graph turns them into the model's normalisation). BoxMOT resizes its crops to 256x128 whatever the
model: the small and base variants' input size (the tiny variant's is 128x64).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli import USER_ERRORS, prog_name, report
from .deploy.export import FORMATS, INPUT_DTYPES, INPUT_NORMS, check_input_options, export
from .deploy.load import load_for_inference
from .deploy.weights import weights_from_checkpoint
from .extras import require


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog_name("amfor.export"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--format", choices=FORMATS, default="onnx")
    parser.add_argument("--output", help="file to write (default: next to the checkpoint, .onnx, .pt2 or .safetensors)")
    parser.add_argument("--global-only", action="store_true", help="export only the global feature [B, D]")
    parser.add_argument("--no-camids", action="store_true",
                        help="no camids input: every camera unknown (the seen cameras' mean offsets)")
    parser.add_argument("--input-dtype", choices=INPUT_DTYPES, default="float32",
                        help="uint8: the graph takes RGB pixels 0..255 and normalises them itself (ONNX and .pt2)")
    parser.add_argument("--input-norm", choices=INPUT_NORMS, default="model",
                        help="float32 images normalised with the model's mean and std (default) or ImageNet's")
    parser.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--no-check", action="store_true", help="skip the parity check")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        check_input_options(args.input_dtype, args.input_norm)
    except ValueError as exc:
        return report(parser.prog, exc)
    out = Path(args.output) if args.output else Path(args.checkpoint).with_suffix(
        {"onnx": ".onnx", "torch-export": ".pt2", "weights": ".safetensors"}[args.format])
    written = [p for p in (out, Path(f"{out}.json")) if not p.exists()]  # removed again when the export fails
    try:
        if args.format == "weights":
            spec = weights_from_checkpoint(args.checkpoint, out, args.set)
            print(f"wrote {out}")
            print(json.dumps(spec, indent=1))
            return 0
        if args.format == "onnx":
            require("onnx", "onnxscript", extra="export", purpose="--format onnx")
        model, _, _ = load_for_inference(args.checkpoint, overrides=args.set)
        spec = export(model, args.format, out, args.global_only, args.opset, not args.no_check,
                      camids=not args.no_camids, input_dtype=args.input_dtype, input_norm=args.input_norm)
    except BaseException as exc:
        for path in written:
            path.unlink(missing_ok=True)
        if isinstance(exc, USER_ERRORS):
            return report(parser.prog, exc)
        raise
    print(f"wrote {out}")
    print(json.dumps(spec, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
