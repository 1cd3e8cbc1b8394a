"""The backend choice (amfor.ops._backend, through the public queries of amfor.ops) and the build of amfor._C."""

import os
import shutil

import pytest
import torch

import amfor.ops as ops
from amfor.ops import available_backends, backend_for, current_backend, use_backend


def test_extension_is_built_and_loaded():
    loaded, why = ops.extension_status()
    assert loaded, why


def test_cuda_kernels_are_compiled_wherever_nvcc_is():
    """The install compiles csrc/cuda whenever nvcc and a CUDA build of torch exist, GPU or not."""
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    has_nvcc = shutil.which("nvcc") is not None or os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
    if not (has_nvcc and torch.version.cuda) or os.environ.get("AMFOR_BUILD_CUDA") == "0":
        pytest.skip("no nvcc or a CPU build of torch: the CUDA kernels are not built here")
    assert ops.extension_has_cuda(), "nvcc is present but amfor._C has no CUDA kernels registered"


def test_available_backends():
    cpu = available_backends("cpu")
    assert cpu[0] == "torch" and "cuda" not in cpu
    assert ("cpp" in cpu) == ops.extension_status()[0]
    assert ("triton" in cpu) == (ops.triton_status()[0] and ops.triton_interpreted())
    reasons = ops.unavailable_reasons("cpu")
    assert "CUDA tensors" in reasons["cuda"]
    assert available_backends("meta") == ["torch"]


def test_use_backend_nests_and_restores(monkeypatch):
    monkeypatch.delenv("AMFOR_BACKEND", raising=False)
    assert current_backend() == "auto"
    with use_backend("torch"):
        with use_backend("cpp"):
            assert current_backend() == "cpp"
        assert current_backend() == "torch"
    assert current_backend() == "auto"
    monkeypatch.setenv("AMFOR_BACKEND", "TORCH")
    assert current_backend() == "torch"


def test_unknown_backend_is_an_error(monkeypatch):
    with pytest.raises(ValueError, match="unknown amfor backend 'gpu'"):
        with use_backend("gpu"):
            pass
    monkeypatch.setenv("AMFOR_BACKEND", "fast")
    with pytest.raises(ValueError, match="'fast'"):
        current_backend()


def test_auto_prefers_the_measured_order():
    """auto takes the first available entry of the op's order; a device type and dtype entry takes precedence."""
    cpp = "cpp" if "cpp" in available_backends("cpu") else "torch"
    with use_backend("auto"):
        assert backend_for("masked_gather", "cpu") == cpp
        assert backend_for("masked_gather", "meta") == "torch"
        assert backend_for("query_fusion_attention", "cpu", torch.float32) == cpp  # "cpu:float32": ("cpp",)
        assert backend_for("query_fusion_attention", "cpu", torch.bfloat16) == "torch"  # "cpu": ()
        assert backend_for("query_fusion_attention", "cpu") == "torch"


def test_without_the_extension_amfor_imports_warns_once_and_falls_back():
    """A missing or broken amfor._C: import works, one warning says why, auto runs the reference."""
    code = """
import sys, warnings
sys.modules["amfor._C"] = None  # makes `import amfor._C` fail, as a missing build would
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    import amfor.ops, amfor.evaluation, amfor.nn, amfor.losses
messages = [str(w.message) for w in caught if "amfor" in str(w.message)]
assert len(messages) == 1 and "cpp and cuda backends are unavailable" in messages[0], messages
assert "cpp" not in amfor.ops.available_backends("cpu")
x, index = torch.randn(2, 5, 3), torch.tensor([[0, 4], [1, 2]])
torch.testing.assert_close(amfor.ops.masked_gather(x, index), x.gather(1, index[:, :, None].expand(-1, -1, 3)))
try:
    with amfor.ops.use_backend("cpp"):
        amfor.ops.masked_gather(x, index)
except RuntimeError as exc:
    assert "amfor._C failed to load" in str(exc), exc
else:
    raise AssertionError("forcing cpp without the extension must fail")
res = amfor.evaluation.evaluate_rank(torch.rand(2, 4), [1, 2], [1, 2, 1, 2], [0, 0], [1, 1, 1, 1])
assert res["num_valid_queries"] == 2
print("ok")
"""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("AMFOR_BACKEND", "TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
