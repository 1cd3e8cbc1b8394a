"""`python -m amfor.test --checkpoint PATH` (or `amfor-test`): evaluate a trained model on its (or another)
configured dataset.

Occluded queries and their whole-body copies (when the dataset has them) against the gallery, with the
part or global distance, flip averaging and re-ranking as configured (`--set test.rerank=true ...`);
prints mAP, R1/5/10 and mINP and writes results.json, ranked lists and CMC curves to --output
(default: <run folder>/test-<date>, made once the model and the data are loaded and removed again when the
evaluation fails). Same numbers as the end of training for the same checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

from .cli import USER_ERRORS, prog_name, report
from .deploy.load import config_of, load_trained_model
from .engine.build import amp_dtype, build_data, log_to_file, make_dirs, remove_made, setup_logging
from .engine.checkpoint import load_checkpoint
from .engine.data import auto_num_workers
from .engine.runner import run_test
from .evaluation.protocol import format_table
from .train import common_args, overrides_of
from .utils import distributed as du


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog_name("amfor.test"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by amfor.train (best.pt, last.pt)")
    common_args(parser)
    args = parser.parse_args(argv)
    overrides = [o for o in overrides_of(args) if not o.startswith("output=")]
    out, made = None, None
    try:
        state = load_checkpoint(args.checkpoint)
        cfg = config_of(state, args.config, overrides)
        device = du.resolve_device(cfg.device)
        du.init_distributed(device)
        out = Path(args.output) if args.output else \
            Path(args.checkpoint).resolve().parent.parent / f"test-{datetime.now():%Y%m%d-%H%M%S}"
        out = Path(du.broadcast_object(str(out)))
        setup_logging(None, hold=True)
        model = load_trained_model(state, cfg, device, args.checkpoint)
        data = build_data(cfg, test=True)
        made = make_dirs(out)
        log_to_file(out)
        results = run_test(model, cfg, device, tuple(model.input_size), out, amp_dtype(cfg.train.amp, device),
                           auto_num_workers(cfg.data.num_workers, du.local_world_size()), data)
        if du.is_main():
            print(format_table(results, f"test ({args.checkpoint})"))
            (out / "results.json").write_text(json.dumps({"checkpoint": str(args.checkpoint), **results}, indent=1))
        du.barrier()
    except BaseException as exc:
        if made is not None:
            setup_logging(None)  # closes log.txt
            remove_made(out, made)
        if isinstance(exc, USER_ERRORS):
            return report(parser.prog, exc)
        raise
    finally:
        du.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
