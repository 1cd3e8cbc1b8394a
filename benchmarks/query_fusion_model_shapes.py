"""query_fusion_attention on the CPU at the shapes of amfor_vit_tiny_patch16's training step: torch vs cpp.

    PYTHONPATH=$PWD python -m benchmarks.query_fusion_model_shapes --threads 2 --runs 12

Cases (batch 64, float32): the AMFF-Encoder's absorbed path at L = 2, 3, 5 (q [64, 3, L, 192], the shared queries
expanded; keys = values = L layer tensors [64, 1, 33, 192]; layer weights [64, L, L]), its projected path
(q [64, 3, 5, 64], keys/values 5 x [64, 3, 33, 64]) and the part decoder's L = 1 call (q [64, 4, 20, 48],
keys/values [64, 4, 32, 48], a bool mask [64, 20, 1, 32]). Forward, and forward + backward to every input, through
the public op; the two backends interleaved (amfor.utils.timing.interleaved_times), 2 warm-up rounds dropped;
best and median in ms, and the ratio of the bests. Not a pytest benchmark: a script for docs/query_fusion.md.
"""

from __future__ import annotations

import statistics

import torch

from amfor.ops import use_backend
from amfor.ops.query_fusion import query_fusion_attention
from amfor.utils.timing import interleaved_times
from benchmarks.common import shape_script_args

WARMUP = 2


def absorbed(L: int) -> tuple:
    """(q, k, v, weights, mask, scale) of the AMFF-Encoder's absorbed path over L layers (keys are values)."""
    g = torch.Generator().manual_seed(L)
    q = torch.randn(1, 3, L, 192, generator=g).expand(64, 3, L, 192).clone()
    kv = [torch.randn(64, 1, 33, 192, generator=g) for _ in range(L)]
    return q, kv, kv, torch.softmax(torch.randn(64, L, L, generator=g), -1), None, 64 ** -0.5


def projected() -> tuple:
    """The AMFF-Encoder's projected path: 3 heads of 64, 5 queries over 5 layers of 33 tokens."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(64, 3, 5, 64, generator=g)
    k = [torch.randn(64, 3, 33, 64, generator=g) for _ in range(5)]
    v = [torch.randn(64, 3, 33, 64, generator=g) for _ in range(5)]
    return q, k, v, torch.softmax(torch.randn(64, 5, 5, generator=g), -1), None, 64 ** -0.5


def part_decoder() -> tuple:
    """The part decoder's cross-attention: 4 heads of 48, 20 queries over 32 tokens, a mask."""
    g = torch.Generator().manual_seed(9)
    q = torch.randn(64, 4, 20, 48, generator=g)
    k, v = torch.randn(64, 4, 32, 48, generator=g), torch.randn(64, 4, 32, 48, generator=g)
    return q, [k], [v], None, torch.rand(64, 20, 1, 32, generator=g) > 0.3, 48 ** -0.5


CASES = {"absorbed L=2": lambda: absorbed(2), "absorbed L=3": lambda: absorbed(3), "absorbed L=5": lambda: absorbed(5),
         "projected L=5": projected, "part decoder L=1": part_decoder}


def step(backend: str, inputs: tuple, backward: bool):
    """A callable running the op once on `backend` (and its backward to every input when `backward`)."""
    q, k, v, w, mask, scale = inputs

    def run() -> None:
        leaves_k = [x.detach().requires_grad_(backward) for x in k]
        leaves_v = leaves_k if v is k else [x.detach().requires_grad_(backward) for x in v]
        leaves_w = None if w is None else w.detach().requires_grad_(backward)
        with use_backend(backend):
            out = query_fusion_attention(q.detach().requires_grad_(backward), leaves_k, leaves_v, leaves_w, mask, scale)
        if backward:
            out.sum().backward()

    return run


def main(argv: list[str] | None = None) -> None:
    args = shape_script_args(__doc__.splitlines()[0], 12, argv)
    for name, make in CASES.items():
        inputs = make()
        for backward in (False, True):
            steps = {b: step(b, inputs, backward) for b in ("torch", "cpp")}
            rounds = interleaved_times(steps, args.runs + WARMUP)
            times = {b: [t * 1e3 for t in ts[WARMUP:]] for b, ts in rounds.items()}
            cells = " | ".join(f"{b} {min(ts):6.2f} / {statistics.median(ts):6.2f}" for b, ts in times.items())
            ratio = min(times["torch"]) / min(times["cpp"])
            print(f"{name:17s} {'fwd+bwd' if backward else 'fwd':7s} {cells} | torch/cpp {ratio:.2f}", flush=True)


if __name__ == "__main__":
    main()
