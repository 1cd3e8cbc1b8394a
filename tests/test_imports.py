"""The ops import and their tests collect on a machine with only torch, Triton, numpy and pytest (issue 25).

The lent GPU machine has no open_clip, ftfy, omegaconf (nor, in this test, timm or matplotlib): each check runs in
a subprocess whose import system refuses those packages, as a machine without them would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("open_clip", "omegaconf", "ftfy", "timm", "matplotlib")
# Put first on sys.meta_path in the subprocess: any import of a blocked package (or of a module inside one) fails
# with ModuleNotFoundError, as on a machine without it (pytest.importorskip skips only on that one).
BLOCKER = """
import importlib.abc, sys
class _Blocked(importlib.abc.MetaPathFinder):
    attempts = []
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            self.attempts.append(name)
            raise ModuleNotFoundError(f"{name} is blocked (not installed on the lent machine)", name=name)
sys.meta_path.insert(0, _Blocked())
"""
LIGHT_MODULES = ("amfor", "amfor.ops", "amfor.nn", "amfor.testing", "amfor.utils.timing", "amfor.evaluation",
                 "amfor.losses", "benchmarks.common", "benchmarks.conftest", "benchmarks.op_calls",
                 "benchmarks.targets", "benchmarks.gpu_report")
OP_TESTS = ("tests/ops", "tests/nn", "tests/evaluation/test_rank.py", "benchmarks/test_masked_patches.py",
            "benchmarks/test_query_fusion.py", "benchmarks/test_distill_loss.py")  # gpu_report's op phases


def _run_blocked(code: str, *args: str, blocked: tuple[str, ...] = BLOCKED,
                 timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    blocker = BLOCKER.replace("in BLOCKED", f"in {blocked!r}")
    return subprocess.run([sys.executable, "-c", blocker + code, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_the_block_refuses_the_model_stack():
    """The blocker works: the models (open_clip, timm) and the engine (omegaconf) fail to import under it, and
    `amfor.create_model` fails only when it is used, naming the missing package."""
    proc = _run_blocked("""
import amfor
for name in ("amfor.models", "amfor.engine.runner"):
    try:
        __import__(name)
    except ImportError as exc:
        print(name, "refused:", exc)
try:
    amfor.create_model
except ImportError as exc:
    print("create_model refused:", exc)
""")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 3 and all("refused" in line and "is blocked" in line for line in lines), proc.stdout


def test_ops_nn_testing_and_benchmark_helpers_import_without_the_model_stack():
    """They import, and do not even try a blocked package (no optional import that would quietly degrade them)."""
    proc = _run_blocked("""
import importlib
for name in sys.argv[1:]:
    importlib.import_module(name)
print("tried:", _Blocked.attempts)
""", *LIGHT_MODULES)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "tried: []"


@pytest.mark.slow
def test_op_tests_and_op_benchmarks_collect_without_the_model_stack():
    """`pytest --collect-only` of the op tests and the op benchmarks: no collection error (a test that needs timm
    skips, it does not break its module's collection)."""
    proc = _run_blocked("import pytest; sys.exit(pytest.main(sys.argv[1:]))", "--collect-only", "-q",
                        "-p", "no:cacheprovider", *OP_TESTS)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "ERROR collecting" not in out, out[-3000:]
    collected = [line for line in proc.stdout.splitlines() if "::" in line]
    for path in OP_TESTS:
        assert any(line.startswith(path) for line in collected), f"nothing collected from {path}"


def test_the_models_load_open_clip_and_matplotlib_only_when_used():
    """With timm but without open_clip, ftfy and matplotlib: the models and the evaluation import, a model without
    the text tower builds, one with it fails naming open_clip."""
    proc = _run_blocked("""
import amfor, amfor.evaluation
model = amfor.create_model("amfor_vit_tiny_patch16", 4, num_cameras=2, text=False)
print("built", type(model).__name__)
try:
    amfor.create_model("amfor_vit_tiny_patch16", 4, num_cameras=2, text=True)
except ImportError as exc:
    print("text refused:", exc)
""", blocked=("open_clip", "ftfy", "matplotlib"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "built AMFOR" and lines[1].startswith("text refused: open_clip"), proc.stdout
