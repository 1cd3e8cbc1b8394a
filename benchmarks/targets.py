"""The device's ceilings, each benchmark figure as a ratio to its peers, and which docs/design.md targets are met.

Used by `benchmarks.gpu_report` on the rows `benchmarks/conftest.py` writes (one dict per benchmark: name, file,
extra_info, median_ms):
- `ceilings(device)`: a device-to-device copy's GB/s and the dense matmul rate (bf16 on a GPU, float32 on the CPU),
  measured in the same run as the benchmarks, so every fraction below compares like with like;
- `with_ratios(rows)`: every row gains `x_vs_<peer>` = the peer's median / this row's median for each other provider
  of the same problem (same op, mode, sizes, dtype), so "2.0" reads "twice as fast as the peer";
- `verdicts(rows, device)`: one line per target of docs/design.md ("Targets"), met / not met / not measured, with the
  figure it was judged on. The targets are for an H100-class GPU; on the CPU only the evaluation target applies.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

# row keys that are measurements or labels of the provider, not a description of the problem
MEASURED = {"name", "file", "provider", "backend", "median_ms", "bytes", "GB/s", "copy_fraction", "copy_GB/s",
            "images_per_s", "launches", "peak_extra_bytes", "peak_memory", "speedup_vs_sdpa_loop", "path"}
KERNELS = ("triton", "cuda", "cpp")
COPY_BYTES = {"cuda": 1 << 30, "cpu": 1 << 28}
MATMUL_N = {"cuda": 8192, "cpu": 1024}


def ceilings(device: str) -> dict:
    """Measured now: copy GB/s (read + write) of COPY_BYTES and the matmul TFLOP/s of two MATMUL_N squares."""
    from benchmarks.common import copy_bandwidth_gbps, device_ms

    n, dtype = MATMUL_N[device], torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = device_ms(lambda: a @ b, device)
    return {"device": device, "copy_bytes": COPY_BYTES[device], "copy_GB/s": copy_bandwidth_gbps(COPY_BYTES[device],
            device), "matmul_n": n, "matmul_dtype": str(dtype).split(".")[-1], "matmul_TFLOP/s": 2 * n**3 / ms / 1e9}


def op_of(row: dict) -> str:
    """The op a row measures: its `op` field, else the test function's name without `test_`."""
    return str(row.get("op") or row["name"].split("[")[0].removeprefix("test_"))


def problem_of(row: dict) -> tuple:
    """What makes two rows the same problem: the op and every field that is not a measurement or the provider."""
    return (op_of(row), *sorted((k, str(v)) for k, v in row.items() if k not in MEASURED and k != "op"))


def provider_of(row: dict) -> str | None:
    return row.get("provider") or row.get("backend")


def with_ratios(rows: Iterable[dict]) -> list[dict]:
    """Copies of `rows`, each with `x_vs_<peer>` for every other provider of its problem that has a median."""
    rows = [dict(r) for r in rows]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if provider_of(row) is not None and isinstance(row.get("median_ms"), int | float):
            groups.setdefault(problem_of(row), []).append(row)
    for group in groups.values():
        for row in group:
            for peer in group:
                if peer is not row and row["median_ms"] > 0:
                    row[f"x_vs_{provider_of(peer)}"] = peer["median_ms"] / row["median_ms"]
    return rows


def _verdict(target: str, values: list[tuple[str, float]], threshold: float, unit: str = "x") -> dict:
    """Met when every measured value (label, figure) reaches `threshold`; not measured without values."""
    if not values:
        return {"target": target, "met": None, "detail": "not measured in this run"}
    worst = min(values, key=lambda v: v[1])
    passed = sum(v >= threshold for _, v in values)
    detail = f"{passed}/{len(values)} problems reach {threshold:g}{unit}; lowest {worst[1]:.3g}{unit} ({worst[0]})"
    return {"target": target, "met": passed == len(values), "detail": detail}


def _values(rows: list[dict], op: str, key: str, providers: Iterable[str] = KERNELS,
            **where) -> list[tuple[str, float]]:
    """(label, row[key]) of the rows of `op` by one of `providers` with the fields in `where`."""
    out = []
    for r in rows:
        if op_of(r) == op and provider_of(r) in providers and isinstance(r.get(key), int | float) and all(
                str(r.get(k)) == str(v) for k, v in where.items()):
            label = ", ".join(f"{k}={v}" for k, v in sorted(r.items()) if k not in MEASURED and not
                              k.startswith("x_vs_") and k != "op")
            out.append((f"{provider_of(r)} {label}", float(r[key])))
    return out


def _gradient_bytes(row: dict) -> float | None:
    """Bytes of the distillation loss's input gradient [G, B, C] for a row that names G, B, C and the dtype."""
    try:
        size = torch.empty(0, dtype=getattr(torch, str(row["dtype"]).split(".")[-1])).element_size()
        return int(row["G"]) * int(row["B"]) * int(row["C"]) * size
    except (KeyError, AttributeError, TypeError, ValueError):
        return None


def verdicts(rows: list[dict], device: str) -> list[dict]:
    """docs/design.md's targets judged on `rows` (which should have passed through `with_ratios`)."""
    if device != "cuda":
        evals = [(r["name"], r["median_ms"] / 1e3) for r in rows if op_of(r) == "evaluate_features_market"
                 and isinstance(r.get("median_ms"), int | float)]
        out = [{"target": t, "met": None, "detail": "a GPU target: not judged on the CPU"} for t in GPU_TARGETS]
        if not evals:
            return out + [{"target": CPU_TARGET, "met": None, "detail": "not measured in this run"}]
        worst = max(evals, key=lambda v: v[1])
        return out + [{"target": CPU_TARGET, "met": worst[1] <= 5.0, "detail": f"{worst[1]:.2f} s ({worst[0]})"}]
    out = []
    for op in ("masked_gather", "masked_scatter"):
        out.append(_verdict(f"{op}: >= 85% of copy bandwidth", _values(rows, op, "copy_fraction"), 0.85, ""))
        out.append(_verdict(f"{op}: >= 2x the MAE-style eager sequence", _values(rows, op, "x_vs_mae"), 2.0))
    out.append(_verdict("query_fusion: >= 75% of copy bandwidth over the key/value bytes",
                        _values(rows, "query_fusion_op", "copy_fraction"), 0.75, ""))
    out.append(_verdict("query_fusion: >= 2x a loop of SDPA calls plus the weighted mix",
                        _values(rows, "query_fusion_op", "x_vs_sdpa_loop"), 2.0))
    full = {"mode": "full"}
    out.append(_verdict("distill_kl_loss: >= 3x eager", _values(rows, "distill_kl_loss", "x_vs_reference", **full),
                        3.0))
    out.append(_verdict("distill_kl_loss: >= 1.3x torch.compile",
                        _values(rows, "distill_kl_loss", "x_vs_reference_compiled", **full), 1.3))
    out.append(_verdict("distill_kl_loss: >= Liger's KL loss", _values(rows, "distill_kl_loss", "x_vs_liger", **full),
                        1.0))
    launches = _values(rows, "distill_kl_loss", "launches", **full)
    out.append({"target": "distill_kl_loss: one launch for forward + backward", "met": None if not launches else
                all(v <= 1 for _, v in launches), "detail": "not measured in this run" if not launches else
                f"launches: {', '.join(f'{v:g} ({k})' for k, v in launches)}"})
    peaks = [(f"{provider_of(r)} C={r.get('C')}", r["peak_extra_bytes"] / g) for r in rows
             if op_of(r) == "distill_kl_loss" and provider_of(r) in KERNELS and str(r.get("mode")) == "full"
             and isinstance(r.get("peak_extra_bytes"), int | float) and (g := _gradient_bytes(r))]
    out.append({"target": "distill_kl_loss: peak extra memory <= one gradient tensor", "met": None if not peaks else
                all(v <= 1.0 for _, v in peaks), "detail": "not measured in this run" if not peaks else
                "peak / gradient bytes: " + ", ".join(f"{v:.2f} ({k})" for k, v in peaks)})
    steps = _values(rows, "training_step", "x_vs_torch", providers=KERNELS, config="full")
    out.append(_verdict("end-to-end AMFOR training step: >= 1.5x the eager reference path", steps, 1.5))
    return out


GPU_TARGETS = ("masked gather/scatter: >= 85% of copy bandwidth, >= 2x the MAE-style eager sequence",
               "query fusion: >= 75% of copy bandwidth, >= 2x a loop of SDPA calls",
               "distillation loss: one launch, >= 3x eager, >= 1.3x torch.compile, >= Liger, peak <= one gradient",
               "end-to-end AMFOR ViT-B training step: >= 1.5x the eager reference path")
CPU_TARGET = "CPU: evaluation of a Market-sized problem (3,368 x 15,913) in a few seconds (<= 5 s) on two cores"
