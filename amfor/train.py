"""`python -m amfor.train` (or `amfor-train`): train AMFOR (both stages) and evaluate it; with no arguments, the
synthetic demo.

    python -m amfor.train                                              # synthetic data, tiny model, CPU, ~10 min
    python -m amfor.train --config occluded_duke --data-root /data --set train.epochs=60
    python -m amfor.train --config my_run.yaml                         # a config by path
    python -m amfor.train --config occluded_duke --resume              # newest runs/<date>-occluded_duke run
    python -m amfor.train --resume runs/20260101-120000-synthetic/checkpoints/last.pt
    torchrun --nproc_per_node=8 -m amfor.train --config market1501 --data-root /data

--config takes a path or the name of a shipped config: {configs}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import USER_ERRORS, prog_name, report
from .config import ConfigError, build_config, list_configs, to_yaml
from .engine.build import find_last_checkpoint
from .engine.checkpoint import load_checkpoint
from .engine.runner import train
from .engine.trainer import NonFiniteLossError


def common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a YAML file, or the name of a shipped config (market1501, occluded_duke, "
                        "...); keys not given keep their defaults")
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
    parser = argparse.ArgumentParser(prog=prog_name("amfor.train"),
                                     description=__doc__.format(configs=", ".join(list_configs())),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(parser)
    parser.add_argument("--resume", nargs="?", const="", metavar="PATH",
                        help="continue exactly from a checkpoint, with its own config (--set changes keys). Without "
                        "PATH: --output's checkpoints/last.pt, else the newest runs/<date>-<name>/checkpoints/last.pt "
                        "of the run name that --config (or --set name=...) gives, default 'synthetic'; --config only "
                        "names the run then")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    try:
        overrides, state, resume = overrides_of(args), None, None
        if args.resume is not None:
            resume = resume_path(args.resume, args.config, overrides)
            state = load_checkpoint(resume)
            cfg = build_config(None, overrides, base=state["config"])
        else:
            cfg = build_config(args.config, overrides)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        train(cfg, resume, state)
    except NonFiniteLossError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 3
    except USER_ERRORS as exc:
        return report(parser.prog, exc)
    return 0


def resume_path(path: str, config: str | None, overrides: list[str]) -> Path:
    """The checkpoint `--resume [PATH]` continues: PATH, else the last one of the run that --output or the run
    name (of --config, then --set) point at. A --config next to a PATH is refused: the checkpoint has the config."""
    if path:
        if config:
            raise ConfigError("--resume PATH continues with the checkpoint's own config: change keys with --set "
                              "(--config names the run only with a bare --resume)")
        return Path(path)
    cfg = build_config(config, overrides)
    return find_last_checkpoint(cfg.name, output=cfg.output or None)


if __name__ == "__main__":
    sys.exit(main())
