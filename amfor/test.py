"""`python -m amfor.test --checkpoint PATH`: evaluate a trained model on its (or another) configured dataset.

Occluded queries and their whole-body copies (when the dataset has them) against the gallery, with the
part or global distance, flip averaging and re-ranking as configured (`--set test.rerank=true ...`);
prints mAP, R1/5/10 and mINP and writes results.json, ranked lists and CMC curves to --output
(default: <run folder>/test-<date>). Same numbers as the end of training for the same checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

from .config import ConfigError
from .engine import distributed as du
from .engine.checkpoint import CheckpointError, load_checkpoint
from .engine.data import auto_num_workers
from .engine.evaluation import format_table
from .engine.inference import config_of, load_trained_model
from .engine.runner import amp_dtype, run_test, setup_logging
from .train import common_args, overrides_of


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m amfor.test", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by amfor.train (best.pt, last.pt)")
    common_args(parser)
    args = parser.parse_args(argv)
    overrides = [o for o in overrides_of(args) if not o.startswith("output=")]
    try:
        state = load_checkpoint(args.checkpoint)
        cfg = config_of(state, args.config, overrides)
        device = du.resolve_device(cfg.device)
        du.init_distributed(device)
        out = Path(args.output) if args.output else \
            Path(args.checkpoint).resolve().parent.parent / f"test-{datetime.now():%Y%m%d-%H%M%S}"
        out = Path(du.broadcast_object(str(out)))
        if du.is_main():
            out.mkdir(parents=True, exist_ok=True)
        setup_logging(out)
        model = load_trained_model(state, cfg, device, args.checkpoint)
        results = run_test(model, cfg, device, tuple(model.input_size), out, amp_dtype(cfg.train.amp, device),
                           auto_num_workers(cfg.data.num_workers, du.local_world_size()))
        if du.is_main():
            print(format_table(results, f"test ({args.checkpoint})"))
            (out / "results.json").write_text(json.dumps({"checkpoint": str(args.checkpoint), **results}, indent=1))
        du.barrier()
    except (ConfigError, CheckpointError) as exc:
        print(f"amfor.test: error: {exc}", file=sys.stderr)
        return 2
    finally:
        du.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
