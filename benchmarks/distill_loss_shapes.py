"""distill_kl_loss on the CPU at AMGD's shapes: torch vs cpp, float32 and bfloat16, forward and forward + backward.

    PYTHONPATH=$PWD python -m benchmarks.distill_loss_shapes --threads 2 --runs 20

Cases: logits [G, B, C] = [10, 64, 170] (AMGD's G granularities at batch 64; the tiny dataset's class count) and
[4, 256, 751] (Market-1501's 751 identities), temperature 4, learned weights [G] (requires grad), reduction
"batchmean"; the teacher detached, as AMGD does. The two backends interleaved (amfor.utils.timing.interleaved_times),
2 warm-up rounds dropped; best and median in ms, and the ratio of the bests. Not a pytest benchmark: a script for
docs/distill_loss.md.
"""

from __future__ import annotations

import statistics

import torch

from amfor.ops import use_backend
from amfor.ops.distill_loss import distill_kl_loss
from amfor.utils.timing import interleaved_times
from benchmarks.common import shape_script_args

WARMUP = 2
SHAPES = ((10, 64, 170), (4, 256, 751))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def inputs(shape: tuple[int, int, int], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(student, teacher, weights) logits of `shape` in `dtype` (weights float32 [G]), seeded by the shape."""
    g = torch.Generator().manual_seed(sum(shape))
    s = (3 * torch.randn(shape, generator=g)).to(dtype)
    t = (3 * torch.randn(shape, generator=g)).to(dtype)
    return s, t, torch.rand(shape[0], generator=g) + 0.5


def step(backend: str, student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor, backward: bool):
    """A callable running the op once on `backend` (and its backward to the student and the weights when
    `backward`)."""

    def run() -> None:
        s, w = student.detach().requires_grad_(backward), weights.detach().requires_grad_(backward)
        with use_backend(backend):
            out = distill_kl_loss(s, teacher, 4.0, w, "batchmean")
        if backward:
            out.backward()

    return run


def main(argv: list[str] | None = None) -> None:
    args = shape_script_args(__doc__.splitlines()[0], 20, argv)
    for shape in SHAPES:
        for dname, dtype in DTYPES.items():
            s, t, w = inputs(shape, dtype)
            for backward in (False, True):
                steps = {b: step(b, s, t, w, backward) for b in ("torch", "cpp")}
                rounds = interleaved_times(steps, args.runs + WARMUP)
                times = {b: [x * 1e3 for x in ts[WARMUP:]] for b, ts in rounds.items()}
                cells = " | ".join(f"{b} {min(ts):6.3f} / {statistics.median(ts):6.3f}" for b, ts in times.items())
                ratio = min(times["torch"]) / min(times["cpp"])
                name = f"{list(shape)} {dname}"
                print(f"{name:20s} {'fwd+bwd' if backward else 'fwd':7s} {cells} | torch/cpp {ratio:.2f}", flush=True)


if __name__ == "__main__":
    main()
