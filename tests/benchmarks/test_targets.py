"""benchmarks/targets.py: peer ratios per problem, the docs/design.md verdicts on hand-made rows, the CPU ceilings."""

from __future__ import annotations

import pytest
import torch

from benchmarks.targets import ceilings, op_of, problem_of, verdicts, with_ratios


def row(name, provider, median_ms, **fields):
    return {"name": name, "file": "benchmarks/x.py", "provider": provider, "median_ms": median_ms, **fields}


def test_ratios_compare_providers_of_the_same_problem_only():
    rows = [row("test_masked_gather[mae-0.25]", "mae", 4.0, op="masked_gather", K=32, dtype="bf16"),
            row("test_masked_gather[triton-0.25]", "triton", 1.0, op="masked_gather", K=32, dtype="bf16"),
            row("test_masked_gather[triton-0.5]", "triton", 3.0, op="masked_gather", K=64, dtype="bf16")]
    out = with_ratios(rows)
    assert out[1]["x_vs_mae"] == 4.0 and out[0]["x_vs_triton"] == 0.25
    assert not any(k.startswith("x_vs_") for k in out[2])  # K=64 has no peer
    assert "x_vs_mae" not in rows[1]  # the input rows are left as they were
    assert problem_of(rows[0]) == problem_of(rows[1]) != problem_of(rows[2])
    assert op_of({"name": "test_distill_kl_loss[cuda-100]"}) == "distill_kl_loss"


def gpu_rows(kernel_ms: float, copy_fraction: float, launches: int):
    rows = []
    for op in ("masked_gather", "masked_scatter"):
        rows.append(row(f"test_{op}[mae]", "mae", 3.0, op=op, K=16))
        rows.append(row(f"test_{op}[triton]", "triton", kernel_ms, op=op, K=16, copy_fraction=copy_fraction))
    rows.append(row("test_query_fusion_op[sdpa_loop]", "sdpa_loop", 3.0, Q=8, N=128, mode="forward"))
    rows.append(row("test_query_fusion_op[triton]", "triton", kernel_ms, Q=8, N=128, mode="forward",
                    copy_fraction=copy_fraction))
    common = dict(G=10, B=64, C=751, dtype="torch.bfloat16", mode="full")
    for provider, ms in (("reference", 4.0), ("reference_compiled", 2.0), ("liger", 1.5)):
        rows.append(row("test_distill_kl_loss[x]", provider, ms, **common))
    rows.append(row("test_distill_kl_loss[x]", "triton", kernel_ms, launches=launches,
                    peak_extra_bytes=10 * 64 * 751 * 2, **common))
    rows.append({"name": "test_training_step[full-torch]", "backend": "torch", "median_ms": 3.0, "config": "full"})
    rows.append({"name": "test_training_step[full-triton]", "backend": "triton", "median_ms": kernel_ms,
                 "config": "full"})
    return with_ratios(rows)


def test_every_gpu_target_met():
    out = verdicts(gpu_rows(kernel_ms=1.0, copy_fraction=0.9, launches=1), "cuda")
    assert len(out) == 12 and all(v["met"] is True for v in out), [v for v in out if not v["met"]]


def test_gpu_targets_missed_are_named_with_their_figure():
    out = {v["target"]: v for v in verdicts(gpu_rows(kernel_ms=1.9, copy_fraction=0.8, launches=3), "cuda")}
    gather = out["masked_gather: >= 85% of copy bandwidth"]
    assert gather["met"] is False and "0/1 problems reach 0.85" in gather["detail"] and "0.8" in gather["detail"]
    assert out["masked_gather: >= 2x the MAE-style eager sequence"]["met"] is False  # 3.0 / 1.9 = 1.58x
    assert out["query_fusion: >= 75% of copy bandwidth over the key/value bytes"]["met"] is True
    assert out["distill_kl_loss: >= 3x eager"]["met"] is False  # 2.1x
    assert out["distill_kl_loss: >= 1.3x torch.compile"]["met"] is False  # 1.05x
    assert out["distill_kl_loss: >= Liger's KL loss"]["met"] is False  # 0.79x
    assert out["distill_kl_loss: one launch for forward + backward"]["met"] is False
    assert out["distill_kl_loss: peak extra memory <= one gradient tensor"]["met"] is True
    assert out["end-to-end AMFOR training step: >= 1.5x the eager reference path"]["met"] is True  # 1.58x


def test_targets_without_figures_are_not_judged():
    out = verdicts([], "cuda")
    assert all(v["met"] is None and v["detail"] == "not measured in this run" for v in out)


def test_on_the_cpu_only_the_evaluation_target_is_judged():
    fast = [row("test_evaluate_features_market", None, 2500.0)]
    out = verdicts(fast, "cpu")
    assert [v["met"] for v in out[:-1]] == [None] * (len(out) - 1)
    assert out[-1]["met"] is True and "2.50 s" in out[-1]["detail"]
    assert verdicts([row("test_evaluate_features_market", None, 7000.0)], "cpu")[-1]["met"] is False


def test_cpu_ceilings_are_measured(monkeypatch):
    import benchmarks.targets as targets

    monkeypatch.setitem(targets.COPY_BYTES, "cpu", 1 << 22)
    monkeypatch.setitem(targets.MATMUL_N, "cpu", 128)
    c = ceilings("cpu")
    assert c["copy_GB/s"] > 0 and c["matmul_TFLOP/s"] > 0 and c["matmul_dtype"] == "float32"
    assert c["copy_bytes"] == 1 << 22 and c["matmul_n"] == 128


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_ceilings():
    c = ceilings("cuda")
    assert c["matmul_dtype"] == "bfloat16" and c["copy_GB/s"] > 100
