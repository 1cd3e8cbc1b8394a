"""CPU inference throughput of the tracker model: AMFOR against OSNet, the model CPU trackers run.

What is timed: the global feature of a batch of 256x128 images, L2-normalised ([B, D]: what a tracker reads, the graph
`amfor-export --no-camids --global-only` writes), with random weights (speed does not depend on them):
- `amfor_vit_tiny_patch16` and `amfor_vit_small_patch16` with every component on (the paper's model; at inference the
  AMFF-Encoder and the text bank run, the training-only branches do not), at 256x128 (the tiny variant's own default
  is 128x64: here both take OSNet's input size);
- OSNet x1.0 and x0.25 (torchreid's definition, `pip install "amfor[bench]"`; its module file alone is loaded, so
  torchreid's own imports, OpenCV among them, are not needed).
Providers: `eager_fp32` (no_grad; amfor's default op backend), `eager_bf16` (CPU autocast to bfloat16, run only where
the CPU has native bf16: avx512_bf16 or amx_bf16 in /proc/cpuinfo and oneDNN's bf16 support), `compiled`
(torch.compile; compilation is warm-up, never timed) and `onnxruntime` (the ONNX export run by ONNX Runtime's CPU
provider with as many threads as torch; AMFOR through `amfor.deploy.export`, as `amfor-export` writes it).
Each model's GFLOPs per image and parameter count are recorded beside its speed: the first reason one is faster.

`test_cpu_inference[batch1]`, `[batch64]`: every model x provider is checked against its eager fp32 features first,
then all are timed in interleaved rounds (`interleaved_times`: each in turn, reversed every other round; a batch-1
step is 8 calls). Reported: images/s (best round), and the per-round ratio AMFOR / OSNet images/s (median, bootstrap
95% interval; > 1: AMFOR is faster), against each OSNet in the same provider and against each OSNet's fastest
provider. Results: benchmarks/results/<date>-inference-cpu-<N>core.json (AMFOR_BENCH_INFERENCE_JSON to change it),
and a table with `-s`.

Rounds: 5 (AMFOR_BENCH_ROUNDS). AMFOR_BENCH_QUICK=1: batch 1 only, one round, the file's name ends in -quick (a check
of the code, not a measurement). Threads: torch's default, or AMFOR_BENCH_THREADS=N (ONNX Runtime gets the same).
AMFOR_BENCH_PROVIDERS=eager_fp32,onnxruntime (a comma list) runs only those (compiling four models takes minutes).
Run it on an idle machine: eager PyTorch with more threads than free cores collapses (OSNet x1.0 at batch 1 took
113 ms on one thread and 8 s on two on a 2-core machine at load 8), ONNX Runtime's own thread pool much less.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import amfor
from amfor.utils.cpu_features import native_bf16
from amfor.utils.timing import cpu_name
from benchmarks.common import QUICK, check_close, interleaved_rounds, interleaved_times, paired_speedup

SIZE = (256, 128)
AMFOR_MODELS = ("amfor_vit_tiny_patch16", "amfor_vit_small_patch16")
OSNETS = ("osnet_x1_0", "osnet_x0_25")
ALL_PROVIDERS = ("eager_fp32", "eager_bf16", "compiled", "onnxruntime")
BATCHES = (1,) if QUICK else (1, 64)
ROUNDS = 1 if QUICK else interleaved_rounds(5)
INNER = {1: 8, 64: 1}  # calls per timed step: a batch-1 call alone is too short to time against the noise
TOLERANCE = {"eager_bf16": 5e-2, "compiled": 1e-4, "onnxruntime": 1e-4}  # on L2-normalised features
RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS: dict = {}


def chosen_providers() -> tuple[str, ...]:
    """$AMFOR_BENCH_PROVIDERS (eager_fp32 always: the others are checked against it), else every provider."""
    value = os.environ.get("AMFOR_BENCH_PROVIDERS", "")
    if not value:
        return ALL_PROVIDERS
    names = {v.strip() for v in value.split(",") if v.strip()}
    unknown = names - set(ALL_PROVIDERS)
    if unknown:
        raise ValueError(f"AMFOR_BENCH_PROVIDERS: unknown {sorted(unknown)}; the providers are {ALL_PROVIDERS}")
    return tuple(p for p in ALL_PROVIDERS if p in names or p == "eager_fp32")


PROVIDERS = chosen_providers()


class GlobalFeature(nn.Module):
    """images [B, 3, H, W] -> the L2-normalised global feature [B, D], eval mode."""

    def __init__(self, model: nn.Module, amfor_model: bool) -> None:
        super().__init__()
        self.model, self.amfor_model = model.eval(), amfor_model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.amfor_model:
            return self.model(images, global_only=True)["features"]
        return F.normalize(self.model(images), dim=-1)


def osnet_factory(name: str) -> Callable[..., nn.Module]:
    """torchreid's `osnet_x1_0` / `osnet_x0_25`, from its module file (skip when torchreid is not installed)."""
    spec = importlib.util.find_spec("torchreid")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip('OSNet comes from torchreid: pip install "amfor[bench]"')
    path = Path(spec.submodule_search_locations[0]) / "reid" / "models" / "osnet.py"
    module_spec = importlib.util.spec_from_file_location("_torchreid_osnet", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return getattr(module, name)


def build(name: str) -> GlobalFeature:
    torch.manual_seed(0)
    if name in AMFOR_MODELS:
        model = amfor.create_model(name, num_classes=751, num_cameras=6, img_size=SIZE)
        model.finish_stage1()  # the text bank the AMFF-Encoder reads
        return GlobalFeature(model, amfor_model=True).eval()
    return GlobalFeature(osnet_factory(name)(num_classes=751, pretrained=False), amfor_model=False).eval()


def cost(feature: GlobalFeature) -> dict:
    """GFLOPs of one image's forward (torch's FLOP counter: matmuls and convolutions, a multiply-add = 2) and the
    parameters the forward reads (the model's own, training-only branches included)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:  # grad on: its module tracker fails under no_grad
        feature(images(1))
    params = sum(p.numel() for p in feature.parameters())
    return {"gflops_per_image": counter.get_total_flops() / 1e9, "parameters_m": params / 1e6}


def onnx_session(feature: GlobalFeature, path: Path):
    """ONNX Runtime session of the model's [B, D] graph (batch dynamic), CPU provider, torch's thread count."""
    import onnxruntime as ort

    if feature.amfor_model:
        from amfor.deploy.export import export

        export(feature.model, "onnx", path, global_only=True, camids=False, check=False)
    else:
        batch = torch.export.Dim("batch", min=1, max=1024)
        with torch.no_grad():
            torch.onnx.export(feature, (torch.randn(2, 3, *SIZE),), str(path), dynamo=True, input_names=["images"],
                              output_names=["features"], dynamic_shapes={"images": {0: batch}}, external_data=False,
                              verbose=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def provider_fn(feature: GlobalFeature, provider: str, folder: Path, name: str
                ) -> Callable[[torch.Tensor], torch.Tensor]:
    """images -> features [B, D] (a float32 tensor) through `provider`."""
    if provider in ("eager_fp32", "eager_bf16", "compiled"):
        module = torch.compile(feature, dynamic=False) if provider == "compiled" else feature

        def run(images: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=provider == "eager_bf16"):
                return module(images).float()
        return run
    session = onnx_session(feature, folder / f"{name}.onnx")
    input_name = session.get_inputs()[0].name
    return lambda images: torch.from_numpy(session.run(None, {input_name: images.numpy()})[0])


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> dict:
    """{(model, provider): images -> features} for every model and provider that runs here, and why others do not."""
    pytest.importorskip("onnxruntime")
    threads = os.environ.get("AMFOR_BENCH_THREADS", "")
    if threads:
        if not threads.isdigit() or int(threads) < 1:
            raise ValueError(f"AMFOR_BENCH_THREADS must be a positive integer, got {threads!r}")
        torch.set_num_threads(int(threads))
    folder = tmp_path_factory.mktemp("inference")
    bf16_ok, bf16_why = native_bf16()
    fns, not_run, costs = {}, {}, {}
    for name in (*AMFOR_MODELS, *OSNETS):
        feature = build(name)
        costs[name] = cost(feature)
        for provider in PROVIDERS:
            if provider == "eager_bf16" and not bf16_ok:
                not_run[f"{name}/{provider}"] = bf16_why
                continue
            fns[(name, provider)] = provider_fn(feature, provider, folder, name)
    return {"fns": fns, "not_run": not_run, "bf16": bf16_why, "costs": costs}


def images(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, *SIZE, generator=torch.Generator().manual_seed(batch))


def ratio_rows(times: dict) -> dict:
    """AMFOR / OSNet images/s per round (median and 95% interval): same provider, and OSNet's fastest provider."""
    best = {o: min((k for k in times if k[0] == o), key=lambda k: min(times[k])) for o in OSNETS}
    rows = {}
    for (name, provider), ts in times.items():
        if name not in AMFOR_MODELS:
            continue
        for osnet in OSNETS:
            if (osnet, provider) in times:
                rows[f"{name}/{provider} vs {osnet}/{provider}"] = list(paired_speedup(times[(osnet, provider)], ts))
            rows[f"{name}/{provider} vs {osnet}/{best[osnet][1]} (its fastest)"] = list(
                paired_speedup(times[best[osnet]], ts))
    return rows


def write_results() -> Path:
    cores = os.cpu_count() or 0
    stamp = RESULTS.setdefault("started", time.strftime("%Y-%m-%d-%H%M"))
    default = RESULTS_DIR / f"{stamp}-inference-cpu-{cores}core{'-quick' if QUICK else ''}.json"
    path = Path(os.environ.get("AMFOR_BENCH_INFERENCE_JSON", default))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(RESULTS, indent=1))
    return path


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"batch{b}")
def test_cpu_inference(benchmark, suite, batch):
    import onnxruntime

    x = images(batch)
    fns = suite["fns"]
    for (name, provider), fn in fns.items():  # correctness first; also the warm-up (compilation) of each
        if provider != "eager_fp32":
            check_close(fn(x), fns[(name, "eager_fp32")](x), f"{name}/{provider}", tol=TOLERANCE[provider])
    inner = INNER.get(batch, 1)

    def step(fn):
        def run():
            for _ in range(inner):
                fn(x)
        return run

    runs = {key: step(fn) for key, fn in fns.items()}
    times = interleaved_times(runs, ROUNDS)
    ips = {key: batch * inner / min(ts) for key, ts in times.items()}
    ratios = ratio_rows(times)
    benchmark.pedantic(runs[(AMFOR_MODELS[0], "eager_fp32")], rounds=1, warmup_rounds=0)
    row = {"batch": batch, "rounds": ROUNDS, "calls_per_step": inner,
           "images_per_s": {f"{n}/{p}": v for (n, p), v in ips.items()},
           "median_ms_per_call": {f"{n}/{p}": 1e3 * statistics.median(ts) / inner for (n, p), ts in times.items()},
           "ratio_amfor_over_osnet": ratios, "not_run": suite["not_run"]}
    RESULTS.update(machine={"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "bf16": suite["bf16"], "torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
                   input_size=list(SIZE), quick=QUICK, cost=suite["costs"])
    RESULTS.setdefault("batches", {})[str(batch)] = row
    path = write_results()
    benchmark.extra_info.update(batch=batch, images_per_s=row["images_per_s"], ratios=ratios, results_file=str(path))
    print(f"\nCPU inference, batch {batch}, {SIZE[0]}x{SIZE[1]}, {torch.get_num_threads()} threads on {cpu_name()}; "
          f"{ROUNDS} interleaved rounds; {suite['bf16']}")
    print(f"  {'model':26s} {'GFLOPs':>7s} " + " ".join(f"{p:>12s}" for p in PROVIDERS) + "   (images/s)")
    for name in (*AMFOR_MODELS, *OSNETS):
        cells = [f"{ips[(name, p)]:12.1f}" if (name, p) in ips else f"{'-':>12s}" for p in PROVIDERS]
        print(f"  {name:26s} {suite['costs'][name]['gflops_per_image']:7.2f} " + " ".join(cells))
    for label, (mid, lo, hi) in ratios.items():
        print(f"  {label:70s} {mid:6.3f}x ({lo:.3f}-{hi:.3f})")
    print(f"  written to {path}")
