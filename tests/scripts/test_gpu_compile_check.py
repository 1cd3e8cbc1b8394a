"""scripts/gpu_compile_check.py: every kernel compiles for sm_80/86/90 within the shared memory there (no GPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runs import run_cli

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_compile_check.py"
triton = pytest.importorskip("triton")


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The script in its own process group: a timeout kills its compile workers too."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return run_cli([str(SCRIPT), *args], ROOT, timeout, check=False, env=env)


@pytest.mark.slow
def test_float64_scalars_compile_as_float64(tmp_path):
    """The launchers' real signatures: a float64 kernel gets no float32 scalar (1/T, T, the reduction factor)."""
    out = tmp_path / "r.json"
    proc = _run("--targets", "90", "--skip-cuda", "--only", "distill torch.float64 G11 B64 C751 s1 t0",
                "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    code = subprocess.run([sys.executable, "-c", f"""
import sys; sys.path.insert(0, {str(ROOT / 'scripts')!r})
import os; os.environ.pop("TRITON_INTERPRET", None)
import gpu_compile_check as g
g._install_capture()
configs = g._configs_for_target(90, "distill torch.float64")
assert configs
for c in configs:
    scalars = {{k: v for k, v in c["signature"].items() if v.startswith("fp")}}
    assert scalars and all(v == "fp64" for v in scalars.values()), scalars
print("ok")
"""], capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert code.returncode == 0 and code.stdout.strip().endswith("ok"), code.stderr[-3000:]
    assert json.loads(out.read_text())["triton"], "nothing was compiled"


@pytest.mark.slow
def test_every_kernel_compiles_for_every_target(tmp_path):
    """The whole tier: Triton and CUDA, sm_80/86/90; no compile error, no shared memory above a target's limit."""
    out = tmp_path / "r.json"
    proc = _run("--json", str(out), timeout=900)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    report = json.loads(out.read_text())
    kernels = {(r["kernel"], r["target"]) for r in report["triton"]}
    for name in ("_gather_rows_kernel", "_segment_sum_rows_kernel", "_fwd_kernel", "_dq_kernel", "_dkdv_kernel",
                 "_distill_kl_kernel"):
        for target in (80, 86, 90):
            assert (name, target) in kernels, (name, target)
    print(f"compile tier: {report['summary']['seconds']:.0f} s")  # meant to stay under 3 minutes on two cores
