"""What an image of an unknown camera (or a camera training never saw) should get: the seen cameras' mean offsets,
or no offset at all. A trained checkpoint is evaluated on the validation split three ways:

- `known`:  every image with its own camera id (what training saw);
- `mean`:   every image as an unknown camera (camids=None): the SIE embedding and the centring mean of the seen
            cameras' average (the model's behaviour);
- `none`:   every image as an unknown camera with no offset: no SIE term and no centring (every camera marked
            unseen, so both averages are empty and read 0).

The protocol's same-camera filter always uses the true camera ids; only what the model is told changes.

    python -m projects.cameras.unknown_camera runs/<run>/checkpoints/last.pt [--split val|test] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from amfor.deploy.load import load_for_inference
from amfor.engine.build import build_data
from amfor.evaluation.protocol import TEST_PAIRS, VAL_PAIRS, evaluate


class UnknownCameras(torch.nn.Module):
    """The model, told that every image's camera is unknown (the evaluation's extract() contract)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.pretrained_cfg = getattr(model, "pretrained_cfg", None)

    def forward(self, img, camid, global_only=False):
        return self.model(img, None, global_only=global_only)


def unseen_everywhere(model: torch.nn.Module) -> None:
    """Mark every camera unseen: the seen-camera averages of SIE and of the centring means become 0."""
    for buffer in (getattr(model, "cameras_seen", None),
                   getattr(getattr(model, "camera_centering", None), "seen", None)):
        if buffer is not None:
            buffer.zero_()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m projects.cameras.unknown_camera", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument("--out", help="write the three rows as JSON here")
    args = parser.parse_args(argv)
    model, cfg, _ = load_for_inference(args.checkpoint)
    cfg.test.rerank = False
    data = build_data(cfg)
    pairs = VAL_PAIRS if args.split == "val" else TEST_PAIRS[:1]
    size = tuple(model.input_size)
    rows = {}
    for name in ("known", "mean", "none"):
        if name == "none":
            unseen_everywhere(model)
        subject = model if name == "known" else UnknownCameras(model).eval()
        metrics = evaluate(subject, data, pairs, cfg, torch.device("cpu"), size, num_workers=0, rerank=False)
        label = pairs[0][0]
        rows[name] = {"mAP": metrics[label]["mAP"], "R1": metrics[label]["R1"]}
        print(f"{name:6s} {args.split} mAP {rows[name]['mAP']:.4f} R1 {rows[name]['R1']:.4f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"checkpoint": str(args.checkpoint), "split": args.split,
                                              "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
