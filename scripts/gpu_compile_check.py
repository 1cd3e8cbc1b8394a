"""GPU compile tier, on any machine with a CPU: every kernel compiled for sm_80, sm_86 and sm_90, no GPU needed.

    python scripts/gpu_compile_check.py [--targets 80,86,90] [--jobs 2] [--skip-cuda] [--skip-triton]
                                        [--json out.json] [--markdown]

Triton: the launchers of amfor.kernels run on CPU tensors with every Triton launch intercepted; each
interception yields the launcher's real signature, constexprs, attributes and options (the binder Triton
itself uses), for the shapes of docs/design.md and the models (ViT-B and the tiny variant; float32, float16,
bfloat16, float64). Each distinct configuration is compiled ahead of time for each target with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`, through Triton's bundled ptxas, whose
`-v` log gives registers and spills; shared memory is the compiled kernel's. A compile error, or shared
memory above the target's opt-in limit, fails the check. Launchers pick their tiles from the device's limit
(amfor.kernels._launch.shared_memory_limit), which is set to each target's limit while its cases run.

CUDA: csrc/cuda/*.cu compiled with nvcc -Xptxas -v for the same targets (when nvcc is found), flags as
setup.py builds them; registers, spills and shared memory per kernel instance are summarised per file.

A spill is reported, not failed: it is a thing to look at. Exit code 1 on any compile error or smem overflow.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compile the real kernels, not the interpreter's

ROOT = Path(__file__).resolve().parent.parent
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # opt-in bytes per block
TARGETS = (80, 86, 90)


@dataclass
class Result:
    kernel: str
    target: int
    config: str
    regs: int = -1
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0
    seconds: float = 0.0
    error: str = ""
    cases: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.error) or self.smem > SMEM_LIMIT[self.target]


# ---------------------------------------------------------------------------------------------------------
# Triton: capture the launches of the real launchers
# ---------------------------------------------------------------------------------------------------------
_CAPTURED: list[tuple] = []


def _install_capture() -> None:
    from triton import knobs
    from triton.runtime.jit import JITFunction

    def capture(self, *args, grid, warmup, **kwargs):
        kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        _CAPTURED.append((self, args, kwargs))

    JITFunction.run = capture


def _launcher_cases():
    """(case name, thunk) for every launcher call the ops make at the shapes of docs/design.md and the models."""
    import torch
    from amfor.kernels import distill_loss, masked_patches, query_fusion

    f32, f16, bf16, f64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
    cases = []

    def e(*shape, dtype=f32):  # never touched: pages are not committed
        return torch.empty(*shape, dtype=dtype)

    # masked_patches: ViT-B (D = 768) and tiny (D = 192); N = 242 tokens, half of them kept. float16 shares
    # bfloat16's code path (16-bit loads, float32 math) and is compiled for query fusion, where it differs.
    for dt in (f32, bf16, f64):
        for D in (768, 192):
            B, N, K = 64, 242, 121
            x, pos = e(B, N, D, dtype=dt), e(N, D, dtype=dt)
            for idx_dt in (torch.int64, torch.int32) if dt != f64 else (torch.int64,):
                idx = torch.zeros(B, K, dtype=idx_dt)
                cases.append((f"gather {dt} D{D} {idx_dt}", lambda x=x, i=idx, p=pos: masked_patches.gather_rows(
                    x, i, None, p, pos_by_output=False)))
            idx = torch.zeros(B, K, dtype=torch.int64)
            inv = torch.zeros(B, N, dtype=torch.int64)
            y, tok = e(B, K, D, dtype=dt), e(D, dtype=dt)
            cases.append((f"gather-nopos {dt} D{D}", lambda x=x, i=idx: masked_patches.gather_rows(
                x, i, None, None, pos_by_output=False)))
            cases.append((f"scatter {dt} D{D}", lambda y=y, i=inv, t=tok, p=pos: masked_patches.gather_rows(
                y, i, t, p, pos_by_output=True)))
            cases.append((f"scatter-nopos {dt} D{D}", lambda y=y, i=inv, t=tok: masked_patches.gather_rows(
                y, i, t, None, pos_by_output=True)))
            perm, starts = torch.zeros(B, K, dtype=torch.int64), torch.zeros(B, N + 1, dtype=torch.int64)
            cases.append((f"segment-sum {dt} D{D}", lambda y=y, p=perm, s=starts, N=N: masked_patches.segment_sum_rows(
                y, p, s, N)))

    # query_fusion: projected path (H = Hkv, head dim 64; ViT-B H = 12, tiny H = 3), absorbed path (Hkv = 1,
    # head dim D = 768 / 192), and head dim 128; Q in {7, 10, 16}, L in {1, 4, 6}, N = 242; float64 is not Triton's.
    shapes = [(12, 12, 10, 4, 64), (3, 3, 7, 1, 64), (12, 1, 10, 4, 768), (3, 1, 10, 4, 192), (8, 8, 10, 4, 128),
              (8, 1, 10, 4, 128)]
    for dt in (f32, f16, bf16):
        for i, (H, Hkv, Q, L, d) in enumerate(shapes):
            B, N = 64 if Hkv > 1 else 16, 242
            q, w = e(B, H, Q, d, dtype=dt), e(B, Q, L)
            k = [e(B, Hkv, N, d, dtype=dt) for _ in range(L)]
            for masked in (False, True) if i in (0, 2) else (False,):  # masks: ViT-B projected and absorbed
                m = torch.zeros(B, Q, L, N, dtype=torch.bool) if masked else None
                lse, g = e(B, H, Q, L), e(B, H, Q, d, dtype=dt)
                name = f"qf {dt} H{H} Hkv{Hkv} Q{Q} L{L} d{d}{' mask' if masked else ''}"
                cases.append((f"{name} fwd", lambda q=q, k=k, w=w, m=m: query_fusion.forward(q, k, k, w, m, 0.125)))
                cases.append((f"{name} bwd", lambda q=q, k=k, w=w, m=m, g=g, lse=lse: query_fusion.backward(
                    g, q, k, k, w, m, 0.125, lse)))

    # distill_loss: G = 11 granularities, B = 64 (and 1), C in {702, 751, 1501, 4101} and 11001 (swept rows);
    # the training call (student grad, weights) and evaluation (no grad, no weights).
    # B = 1 (a specialised constant) at one class count.
    for dt in (f32, bf16, f64):
        wdt = f64 if dt == f64 else f32
        for C in (702, 751, 1501, 4101, 11001):
            for G, B in ((11, 64),) if C != 751 else ((11, 64), (1, 1)):
                s = e(G, B, C, dtype=dt)
                for sg, tg, weighted in ((True, False, True), (False, False, False)):
                    w = e(G, dtype=wdt) if weighted else None
                    name = f"distill {dt} G{G} B{B} C{C} s{int(sg)} t{int(tg)} w{int(weighted)}"
                    cases.append((name, lambda s=s, w=w, sg=sg, tg=tg, B=B: distill_loss.distill_kl_rows(
                        s, s, 2.0, w, 1.0 / B, sg, tg)))
    return cases


def _configs_for_target(arch: int, only: str | None = None) -> list[dict]:
    """Distinct compile configurations the launchers produce with `arch`'s shared-memory limit."""
    from amfor.kernels import _launch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    _launch.TARGET_SHARED_MEMORY = SMEM_LIMIT[arch]
    configs: dict[str, dict] = {}
    binders = {}
    for case, thunk in _launcher_cases():
        if only and not re.search(only, case):
            continue
        _CAPTURED.clear()
        thunk()
        for fn, args, kwargs in _CAPTURED:
            if fn not in binders:
                binders[fn] = create_function_from_signature(fn.signature, fn.params, backend)
            bound, spec, opts = binders[fn](*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
            shown = {k: v for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages")}
            key = repr((fn.__name__, sorted(signature.items()), sorted(constexprs.items(), key=str),
                        sorted(attrs.items(), key=str), sorted(options.__dict__.items(), key=str)))
            entry = configs.setdefault(key, dict(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs,
                                                 options=options.__dict__, target=arch, cases=[],
                                                 config=_describe(signature, shown)))
            entry["cases"].append(case)
    _launch.TARGET_SHARED_MEMORY = None
    return list(configs.values())


def _describe(signature: dict, shown: dict) -> str:
    dtypes = sorted({v.lstrip("*") for k, v in signature.items() if v.startswith("*") and k.endswith("ptr")})
    parts = [f"{k}={v.__name__ if hasattr(v, '__name__') else v}" for k, v in sorted(shown.items())]
    return f"ptr {'/'.join(dtypes)}; " + ", ".join(parts)


_JOBS: list[dict] = []


def _compile_one(i: int) -> Result:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    job = _JOBS[i]
    res = Result(kernel=job["fn"].__name__, target=job["target"], config=job["config"], cases=job["cases"])
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            src = ASTSource(job["fn"], job["signature"], job["constexprs"], job["attrs"])
            kernel = triton.compile(src, target=GPUTarget("cuda", job["target"], 32), options=job["options"])
        res.smem = int(kernel.metadata.shared)
    except Exception as exc:  # noqa: BLE001 - every compile failure is reported, with its message
        res.error = f"{type(exc).__name__}: {str(exc)[-2000:]}"
    res.seconds = time.perf_counter() - start
    text = log.getvalue()
    regs = re.findall(r"Used (\d+) registers", text)
    res.regs = max(map(int, regs)) if regs else -1
    res.spill_stores = sum(map(int, re.findall(r"(\d+) bytes spill stores", text)))
    res.spill_loads = sum(map(int, re.findall(r"(\d+) bytes spill loads", text)))
    return res


def _triton_jobs(targets: list[int], only: str | None) -> tuple[list[dict], list[dict]]:
    """(configurations to compile, sm_86/89 configurations equal to an sm_80 one, reported from its compile).

    Triton generates the same code for sm_80 and sm_86/89 (same MMA and pipelining; only the shared-memory
    limit differs, which the launchers' tile choice sees), so only the configurations the launchers choose
    differently there are compiled again.
    """
    _install_capture()
    by_target = {arch: _configs_for_target(arch, only) for arch in targets}
    jobs, reused = [], []
    base = {_key(c): c for c in by_target.get(80, [])}
    for arch, configs in by_target.items():
        for c in configs:
            (reused if arch in (86, 89) and _key(c) in base else jobs).append(c)
    return jobs, reused


def _key(config: dict) -> str:
    return repr((config["fn"].__name__, sorted(config["signature"].items()), config["config"],
                 sorted(config["constexprs"].items(), key=str)))


def check_triton(targets: list[int], jobs: int, only: str | None = None) -> list[Result]:
    todo, reused = _triton_jobs(targets, only)
    _JOBS.extend(todo)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # a fresh cache: every kernel really goes through ptxas -v
        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            results = list(pool.map(_compile_one, range(len(_JOBS))))
    compiled = {(_key(job), job["target"]): r for job, r in zip(_JOBS, results, strict=True)}
    for c in reused:
        r = compiled[(_key(c), 80)]
        results.append(Result(kernel=r.kernel, target=c["target"], config=r.config + " (sm_80 code)", regs=r.regs,
                              spill_stores=r.spill_stores, spill_loads=r.spill_loads, smem=r.smem, error=r.error,
                              cases=c["cases"]))
    return results


# ---------------------------------------------------------------------------------------------------------
# CUDA C++: nvcc -Xptxas -v per file and target
# ---------------------------------------------------------------------------------------------------------
def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    for cand in (os.path.join(home, "bin", "nvcc"), shutil.which("nvcc")):
        if cand and os.path.exists(cand):
            return cand
    return None


def _nvcc_command(nvcc: str, source: Path, arch: int, out: str) -> list[str]:
    """Device-only compile (-cubin) of `source` for sm_<arch> with setup.py's flags and -Xptxas -v."""
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths(device_type="cuda")]
    includes.append(f"-I{sysconfig.get_paths()['include']}")
    import torch

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [nvcc, "-cubin", str(source), "-o", out, *includes, "-O3", "-lineinfo", "--expt-relaxed-constexpr",
            "-std=c++20", "-DAMFOR_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "-D__CUDA_NO_HALF2_OPERATORS__", f"-arch=sm_{arch}", "-Xptxas", "-v"]


def _nvcc_one(args: tuple[str, str, int]) -> list[Result]:
    nvcc, source, arch = args
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(_nvcc_command(nvcc, Path(source), arch, os.path.join(tmp, "out.cubin")),
                              capture_output=True, text=True)
    seconds = time.perf_counter() - start
    name = Path(source).name
    if proc.returncode != 0:
        return [Result(kernel=name, target=arch, config="nvcc", error=proc.stderr[-3000:], seconds=seconds)]
    # ptxas -v: "Compiling entry function '<mangled>' for 'sm_90'" then "Used N registers, ... X bytes smem"
    results, current = [], None
    for line in proc.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            current = Result(kernel=_kernel_family(m.group(1)), target=arch, config=name)
            results.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.spill_stores, current.spill_loads = int(m.group(1)), int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current.regs = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current.smem = int(s.group(1)) if s else 0
    for r in results:
        r.seconds = seconds / max(len(results), 1)
    return results


def _kernel_family(mangled: str) -> str:
    """The kernel's name in a mangled symbol: ..._1259411dkdv_kernelI... -> dkdv_kernel."""
    m = re.search(r"\d([a-z][a-z_]*_kernel)", mangled)
    return m.group(1) if m else mangled


def check_cuda(targets: list[int], jobs: int) -> list[Result]:
    """The build ships sm_80 and sm_90 cubins (TORCH_CUDA_ARCH_LIST=8.0;9.0): an sm_86/89 card runs the sm_80
    code, so those targets are reported from the sm_80 compile, against their own shared-memory limit."""
    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc not found: the CUDA sources are not compiled here", file=sys.stderr)
        return []
    archs = sorted({80 if t in (86, 89) else t for t in targets})
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"), key=_cost)
    work = [(nvcc, str(src), arch) for src in sources for arch in archs]
    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        results = [r for rs in pool.map(_nvcc_one, work) for r in rs]
    for t in targets:
        if t in (86, 89):
            results += [Result(kernel=r.kernel, target=t, config=r.config + " (sm_80 code)", regs=r.regs,
                               spill_stores=r.spill_stores, spill_loads=r.spill_loads, smem=r.smem, error=r.error)
                        for r in results if r.target == 80]
    return [r for r in results if r.target in targets]


def _cost(source: Path) -> int:
    return -source.stat().st_size  # the largest file first: it bounds the wall time


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------
def summarize(results: list[Result]) -> list[dict]:
    """One row per (kernel, target): configurations, max registers, total spills, max smem, errors."""
    rows: dict[tuple, dict] = {}
    for r in results:
        row = rows.setdefault((r.kernel, r.target), dict(kernel=r.kernel, target=f"sm_{r.target}", configs=0,
                                                         max_regs=0, spill_bytes=0, max_smem=0, failed=0))
        row["configs"] += 1
        row["max_regs"] = max(row["max_regs"], r.regs)
        row["spill_bytes"] += r.spill_stores + r.spill_loads
        row["max_smem"] = max(row["max_smem"], r.smem)
        row["failed"] += int(r.failed)
    return sorted(rows.values(), key=lambda row: (row["kernel"], row["target"]))


def markdown(triton_rows: list[dict], cuda_rows: list[dict]) -> str:
    lines = []
    for title, rows in (("Triton", triton_rows), ("CUDA", cuda_rows)):
        if not rows:
            continue
        lines += [f"| {title} kernel | target | configs | max regs | spill bytes | max smem (KiB) | limit (KiB) |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            limit = SMEM_LIMIT[int(r["target"][3:])] / 1024
            lines.append(f"| {r['kernel']} | {r['target']} | {r['configs']} | {r['max_regs']} | {r['spill_bytes']} "
                         f"| {r['max_smem'] / 1024:.1f} | {limit:.0f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)))
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--skip-triton", action="store_true")
    parser.add_argument("--skip-cuda", action="store_true")
    parser.add_argument("--only", help="only the Triton cases whose name matches this regular expression")
    parser.add_argument("--json", help="write every result here")
    parser.add_argument("--markdown", action="store_true", help="print the summary tables as Markdown")
    args = parser.parse_args(argv)
    targets = [int(t) for t in args.targets.split(",")]
    unknown = [t for t in targets if t not in SMEM_LIMIT]
    if unknown:
        parser.error(f"unknown targets {unknown}; known: {sorted(SMEM_LIMIT)}")
    start = time.perf_counter()
    # nvcc (one long job per file and arch) runs beside the many short Triton compiles: one core each when two
    cuda_jobs = 0 if args.skip_cuda else (1 if not args.skip_triton and args.jobs > 1 else args.jobs)
    with concurrent.futures.ThreadPoolExecutor(1) as background:
        cuda_future = background.submit(check_cuda, targets, cuda_jobs) if cuda_jobs else None
        triton_results = ([] if args.skip_triton else
                          check_triton(targets, max(1, args.jobs - (1 if cuda_future else 0)), args.only))
        t_triton = time.perf_counter() - start
        cuda_results = cuda_future.result() if cuda_future else []
    elapsed = time.perf_counter() - start
    failures = [r for r in triton_results + cuda_results if r.failed]
    for r in failures:
        why = r.error or f"shared memory {r.smem} B > sm_{r.target} limit {SMEM_LIMIT[r.target]} B"
        print(f"FAIL {r.kernel} sm_{r.target} [{r.config}] cases {r.cases[:3]}: {why}", file=sys.stderr)
    for r in triton_results + cuda_results:
        if r.spill_stores or r.spill_loads:
            print(f"spill: {r.kernel} sm_{r.target} [{r.config}]: {r.spill_stores} B stores, {r.spill_loads} B loads")
    triton_rows, cuda_rows = summarize(triton_results), summarize(cuda_results)
    print(markdown(triton_rows, cuda_rows))
    print(f"{len(triton_results)} Triton compiles in {t_triton:.0f} s, {len(cuda_results)} CUDA kernel instances; "
          f"total {elapsed:.0f} s; {len(failures)} failures")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"triton": [asdict(r) for r in triton_results], "cuda": [asdict(r) for r in cuda_results],
             "summary": {"triton": triton_rows, "cuda": cuda_rows, "seconds": elapsed}}, indent=1, default=str))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
