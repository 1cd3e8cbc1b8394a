"""benchmarks/plot.py: PNGs, the results table and the README section from hand-made benchmark JSON."""

import json
from pathlib import Path

import pytest

from benchmarks import plot  # the repository root is on sys.path (tests/benchmarks/conftest.py)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# median ms of each (provider, size): the reference's, then cpp's (2x faster, 2x faster, 2x slower)
GATHER = {"reference": [1.0, 2.0, 4.0], "cpp": [0.5, 1.0, 8.0]}
KL = {"reference": [3.0, 6.0, 9.0], "cpp": [1.0, 3.0, 18.0]}
GATHER_K, KL_C = [60, 121, 181], [751, 1501, 4101]
BYTES = 1_000_000


def _bench(name: str, extra: dict, median_ms: float) -> dict:
    return {"name": name, "fullname": f"benchmarks/test_x.py::{name}", "params": {}, "extra_info": extra,
            "stats": {"median": median_ms * 1e-3, "rounds": 5}}


def _pytest_benchmark_json(path: Path, machine_info: dict | None = None) -> Path:
    """Two ops x two providers x three sizes, and two model-step entries, as pytest-benchmark writes them."""
    benches = []
    for provider, medians in GATHER.items():
        for K, ms in zip(GATHER_K, medians, strict=True):
            benches.append(_bench(f"test_masked_gather[{provider}-{K}]",
                                  {"op": "masked_gather", "provider": provider, "mode": "forward", "B": 32, "N": 242,
                                   "K": K, "D": 768, "median_ms": ms, "bytes": BYTES}, ms))
    for provider, medians in KL.items():
        for C, ms in zip(KL_C, medians, strict=True):  # no median_ms in extra_info: the stats' median is used
            benches.append(_bench(f"test_distill_kl_loss[{provider}-{C}-full]",
                                  {"provider": provider, "G": 11, "B": 8, "C": C, "dtype": "torch.float32",
                                   "mode": "full"}, ms))
    for backend, ms in (("torch", 250.0), ("cpp", 200.0)):
        benches.append(_bench(f"test_training_step[baseline-{backend}]",
                              {"model": "tiny", "config": "baseline", "backend": backend, "batch": 64,
                               "median_ms": ms, "images_per_s": 64 / (ms * 1e-3)}, ms))
    info = machine_info or {"cpu": {"brand_raw": "Test CPU", "count": 2}, "python_version": "3.11.7",
                            "torch": "2.9.0", "gpu": None}
    data = {"machine_info": info, "commit_info": {"id": "abcdef1234567890"}, "benchmarks": benches,
            "datetime": "2026-01-02T03:04:05+00:00", "version": "5.1.0"}
    path.write_text(json.dumps(data))
    return path


def _row(results, op: str, provider: str, size: str):
    (match,) = [r for r in results if r.op == op and r.provider == provider and r.size == size]
    return match


def test_plots_and_table(tmp_path):
    src = _pytest_benchmark_json(tmp_path / "bench.json")
    out = tmp_path / "plots"
    assert plot.main([str(src), "--out", str(out)]) == 0
    for name in ("masked_gather", "distill_kl_loss", "model_step"):
        png = (out / f"{name}.png").read_bytes()
        assert png[:8] == PNG_MAGIC and len(png) > 10_000, name
    assert sorted(p.name for p in out.iterdir()) == ["distill_kl_loss.png", "masked_gather.png", "model_step.png",
                                                     "results.md"]
    results, _ = plot.build([src], tmp_path / "again", None)
    cpp = _row(results, "masked_gather", "cpp", "K=181")
    assert cpp.median_ms == pytest.approx(8.0) and cpp.unit == "GB/s"
    assert cpp.throughput == pytest.approx(BYTES / 8e-3 / 1e9)
    assert _row(results, "distill_kl_loss", "cpp", "C=1501").median_ms == pytest.approx(3.0)
    text = (out / "results.md").read_text()
    assert "| masked_gather | forward | K=60 | reference | 1 | 1 GB/s | 1.00x |" in text
    assert "| masked_gather | forward | K=60 | cpp | 0.5 | 2 GB/s | 2.00x |" in text  # 1.0 / 0.5
    assert "| masked_gather | forward | K=181 | cpp | 8 | 0.125 GB/s | 0.50x |" in text  # 4.0 / 8.0
    assert "| distill_kl_loss | full | C=751 | cpp | 1 | 1,000 calls/s | 3.00x |" in text  # 3.0 / 1.0
    assert "| distill_kl_loss | full | C=1501 | cpp | 3 | 333 calls/s | 2.00x |" in text  # 6.0 / 3.0
    assert "| distill_kl_loss | full | C=4101 | cpp | 18 | 55.6 calls/s | 0.50x |" in text  # 9.0 / 18.0
    assert "| model_step | step | baseline | cpp | 200 | 320 images/s | 1.25x |" in text  # 250 / 200, torch = ref
    assert "Test CPU (2 cores); torch 2.9.0" in text and "![masked_gather](masked_gather.png)" in text


def test_latest_run_wins_and_report_format(tmp_path):
    """A gpu_report report (the stand-in's rows) later than the pytest-benchmark file replaces its rows."""
    old = _pytest_benchmark_json(tmp_path / "old.json", {"gpu": "Test GPU", "torch": "2.9.0"})
    rows = [{"name": f"test_masked_gather[{p}-60]", "file": "benchmarks/test_x.py", "op": "masked_gather",
             "provider": p, "mode": "forward", "K": 60, "median_ms": ms, "bytes": BYTES}
            for p, ms in (("reference", 3.0), ("cpp", 1.0))]
    new = tmp_path / "report.json"
    new.write_text(json.dumps({"environment": {"device": "Test GPU", "torch": "2.9.0", "date": "2026-02-01T00:00:00"},
                               "benchmarks": rows}))
    results, _ = plot.build([old, new], tmp_path / "out", None)
    assert _row(results, "masked_gather", "cpp", "K=60").median_ms == pytest.approx(1.0)
    assert _row(results, "masked_gather", "cpp", "K=181").median_ms == pytest.approx(8.0)  # kept from the old run
    assert "| masked_gather | forward | K=60 | cpp | 1 | 1 GB/s | 3.00x |" in (tmp_path / "out/results.md").read_text()


def test_readme_section_replaced_and_rest_kept(tmp_path):
    src = _pytest_benchmark_json(tmp_path / "bench.json")
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nBefore.\n\n{plot.START}\nold results\n{plot.END}\n\nAfter.\n")
    assert plot.main([str(src), "--out", str(tmp_path / "plots"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# Title\n\nBefore.\n\n" + plot.START + "\n") and text.endswith(plot.END + "\n\nAfter.\n")
    assert "old results" not in text
    assert "| masked_gather | forward | K=60 | cpp | 0.5 | 2 GB/s | 2.00x |" in text
    assert "![model_step](plots/model_step.png)" in text  # relative to the README
    created = tmp_path / "new" / "README.md"
    assert plot.main([str(src), "--out", str(tmp_path / "plots"), "--readme", str(created)]) == 0
    assert created.read_text().count(plot.START) == 1 and "| masked_gather |" in created.read_text()


@pytest.mark.parametrize("content,message", [
    (None, "no such file"),
    ("not json at all", "not benchmark JSON"),
    ('{"some": "dict"}', "not benchmark JSON"),
    ('{"machine_info": {}, "benchmarks": []}', "no benchmarks"),
    ('{"environment": {}, "benchmarks": []}', "no benchmarks"),
])
def test_bad_inputs_exit_2_naming_the_file(tmp_path, capsys, content, message):
    path = tmp_path / "input.json"
    if content is not None:
        path.write_text(content)
    assert plot.main([str(path), "--out", str(tmp_path / "plots")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and message in err
    assert not (tmp_path / "plots").exists()


def test_end_to_end_rows_by_mode_and_configuration_with_peak_memory(tmp_path):
    """test_model.py's test_end_to_end: one bar group per (mode, configuration), speed-ups against the reference
    ops of the same group, peak memory in its own column."""
    benches = []
    for mode, batch in (("train", 64), ("inference", 128)):
        for provider, ms, peak in (("reference", 400.0, 300 * 2**20), ("fused", 320.0, 250 * 2**20),
                                   ("fused_compiled", 200.0, 200 * 2**20)):
            benches.append(_bench(f"test_end_to_end[{mode}-full-{provider}]",
                                  {"model": "tiny", "config": "full", "provider": provider, "mode": mode,
                                   "batch": batch, "median_ms": ms, "images_per_s": batch / (ms * 1e-3),
                                   "peak_memory_bytes": peak}, ms))
    src = tmp_path / "e2e.json"
    src.write_text(json.dumps({"machine_info": {"cpu": {"brand_raw": "Test CPU", "count": 2}}, "benchmarks": benches,
                               "datetime": "2026-01-02T03:04:05+00:00"}))
    out = tmp_path / "plots"
    assert plot.main([str(src), "--out", str(out)]) == 0
    assert (out / "end_to_end.png").read_bytes()[:8] == PNG_MAGIC
    text = (out / "results.md").read_text()
    assert "peak MiB" in text
    assert "| end_to_end | step | train full | fused_compiled | 200 | 320 images/s | 2.00x | 200 |" in text
    assert "| end_to_end | step | inference full | fused | 320 | 400 images/s | 1.25x | 250 |" in text


def test_interleaved_run_lines_give_the_ratio_the_costs_and_the_speedup_over_the_torch_ops():
    info = {"model": "tiny", "backend": "cpp", "batch": 64, "images_per_s": {"baseline": 160.0, "full": 96.0},
            "ratio": 0.6, "target_ratio": 0.6, "marginal_ms": {"hpr": 100.0, "amff": 80.5},
            "torch_ops_images_per_s": 80.0, "speedup_vs_torch_ops": 1.2}
    run = plot.Run(Path("x.json"), "Test CPU", "", None, [])
    lines = plot.interleaved_lines([(run, {"info": info})])
    assert lines[0] == ("- Test CPU, `tiny` batch 64 on `cpp` (best of the rounds, one interleaved run): baseline 160 "
                        "img/s, full 96 img/s, ratio 0.60 (target >= 0.6); the full step on the torch reference ops "
                        "80 img/s, `cpp` 1.20x that")
    assert lines[1] == "  - marginal cost per component (ms of the full step): hpr 100.0, amff 80.5"
    older = {k: v for k, v in info.items() if k not in ("torch_ops_images_per_s", "speedup_vs_torch_ops")}
    assert "torch reference ops" not in plot.interleaved_lines([(run, {"info": older})])[0]  # runs before it
    paired = info | {"ratio_paired": [0.61, 0.58, 0.63], "speedup_vs_torch_ops_paired": [1.005, 0.99, 1.03]}
    line = plot.interleaved_lines([(run, {"info": paired})])[0]
    assert line.endswith("`cpp` 1.20x that; per round (median, 95% interval): ratio 0.610 (0.580-0.630; target >= 0.6),"
                         " 1.005x the torch ops (0.990-1.030)")
    assert "ratio 0.60; the full step" in line  # the best of rounds, no longer labelled with the target


def test_op_share_lines_give_each_backends_total_and_share_of_the_step():
    info = {"model": "tiny", "batch": 64, "step_backend": "cpp", "step_ms": 400.0, "rounds": 20,
            "calls": {"masked_gather": 1, "query_fusion_attention": 7},
            "op_ms": {"masked_gather": {"torch": 1.0, "cpp": 0.5},
                      "query_fusion_attention": {"torch": 11.0, "cpp": 3.5}},
            "total_ms": {"torch": 12.0, "cpp": 4.0}, "share": {"torch": 0.03, "cpp": 0.01}}
    run = plot.Run(Path("x.json"), "Test CPU", "", None, [])
    lines = plot.interleaved_lines([(run, {"name": "test_op_share", "info": info})])
    assert lines == [
        "- Test CPU, `tiny` batch 64: the fused ops' calls of one full step, replayed alone (forward + backward, "
        "median of 20 interleaved rounds with the step), take torch 12.0 ms (3.0%), cpp 4.0 ms (1.0%) of the 400.0 ms "
        "step (`cpp`)",
        "  - ms per step: masked_gather (1 calls) torch 1.00, cpp 0.50; query_fusion_attention (7 calls) torch 11.00, "
        "cpp 3.50"]
    assert plot.interleaved_lines([(run, {"name": "test_op_share", "info": {"model": "tiny"}})]) == []  # no figures
    paired = info | {"torch_step_ms": 410.0, "step_speedup_paired": [1.021, 1.012, 1.03]}
    assert plot.interleaved_lines([(run, {"name": "test_op_share", "info": paired})])[0].endswith(
        "of the 400.0 ms step (`cpp`); the step on the torch ops 410.0 ms, `cpp` 1.021x that per round (95% interval "
        "1.012-1.030)")


def test_a_paired_speedup_replaces_the_ratio_of_separate_medians(tmp_path):
    """test_dropin_training_step's amfor row carries the speed-up timed in the same rounds as the reference: the
    table shows it, with its interval, instead of the ratio of two medians timed minutes apart."""
    benches = [_bench(f"test_dropin_training_step[masked-{p}]",
                      {"case": "masked", "provider": p, "batch": 32, "median_ms": ms} | extra, ms)
               for p, ms, extra in (("reference", 100.0, {}),
                                    ("amfor", 125.0, {"paired_speedup": 1.02, "paired_speedup_ci": [0.99, 1.05],
                                                      "paired_rounds": 12}))]
    src = tmp_path / "dropin.json"
    src.write_text(json.dumps({"machine_info": {"cpu": {"brand_raw": "Test CPU", "count": 2}, "torch": "2.9.0"},
                               "benchmarks": benches, "datetime": "2026-01-02T03:04:05+00:00"}))
    plot.build([src], tmp_path / "out", None)
    text = (tmp_path / "out/results.md").read_text()
    assert "| dropin_step | step | masked | amfor | 125 | 256 images/s | 1.02x (paired, 0.99-1.05) |" in text
    assert "| dropin_step | step | masked | reference | 100 | 320 images/s | 1.00x |" in text
