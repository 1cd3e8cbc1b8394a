"""`python -m amfor.train`: train AMFOR (both stages) and evaluate it; with no arguments, the synthetic demo.

    python -m amfor.train                                              # synthetic data, tiny model, CPU, ~10 min
    python -m amfor.train --config configs/occluded_duke.yaml --data-root /data --set train.epochs=60
    python -m amfor.train --resume                                     # newest runs/*-<name>/checkpoints/last.pt
    torchrun --nproc_per_node=8 -m amfor.train --config configs/market1501.yaml --data-root /data
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import ConfigError, build_config, to_yaml
from .engine.checkpoint import CheckpointError, load_checkpoint
from .engine.runner import find_last_checkpoint, train
from .engine.trainer import NonFiniteLossError


def common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file (configs/*.yaml); keys not given keep their defaults")
    parser.add_argument("--data-root", help="folder holding the dataset (sets data.root)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="dotted overrides, e.g. --set train.epochs=60 model.pretrained=weights/vit.pth")
    parser.add_argument("--output", help="run folder (sets output; default runs/<date>-<name>)")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N (sets device)")


def overrides_of(args: argparse.Namespace) -> list[str]:
    extra = [f"{key}={value}" for key, value in (("data.root", args.data_root), ("output", args.output),
                                                  ("device", args.device)) if value]
    return list(args.set) + extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m amfor.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(parser)
    parser.add_argument("--resume", nargs="?", const="", metavar="PATH",
                        help="continue exactly from a checkpoint (default: newest runs/*-<name>/checkpoints/last.pt)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    try:
        overrides, state, resume = overrides_of(args), None, None
        if args.resume is not None:
            if args.config:
                raise ConfigError("--resume takes the run's config from the checkpoint; change keys with --set")
            resume = Path(args.resume) if args.resume else find_last_checkpoint(build_config(None, overrides).name)
            state = load_checkpoint(resume)
            cfg = build_config(None, overrides, base=state["config"])
        else:
            cfg = build_config(args.config, overrides)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        train(cfg, resume, state)
    except (ConfigError, CheckpointError, NonFiniteLossError, FileExistsError) as exc:
        print(f"amfor.train: error: {exc}", file=sys.stderr)
        return 3 if isinstance(exc, NonFiniteLossError) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
