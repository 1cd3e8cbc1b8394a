"""The build (setup.py) finds CUDA as users have it and never blocks the install.

On our machines `nvcc` is a wrapper script outside the toolkit (`exec /usr/local/cuda-13.0/bin/nvcc "$@"`), so the
folder above it has no CUDA runtime library; torch's own guess of CUDA_HOME is that folder, and the link failed.
"""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_setup():
    spec = importlib.util.spec_from_file_location("amfor_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself runs only as __main__
    return module


setup_py = _load_setup()


def _script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _fake_toolkit(root: Path, cudart: bool = True, lib: str = "lib64", nvcc_body: str | None = None) -> Path:
    """A toolkit folder as far as the build looks: bin/nvcc answering -dryrun as nvcc does, and libcudart.so."""
    home = root / "cuda-13.0"
    body = nvcc_body or f'case " $* " in *" -dryrun "*) echo "#\\$ TOP={home}/bin/.." >&2;; esac\nexit 0'
    _script(home / "bin" / "nvcc", body)
    if cudart:
        (home / lib).mkdir(parents=True)
        (home / lib / "libcudart.so").write_bytes(b"")
    return home


def test_wrapper_nvcc_outside_the_toolkit(tmp_path):
    home = _fake_toolkit(tmp_path)
    wrapper = _script(tmp_path / "bin" / "nvcc", f'exec {home}/bin/nvcc "$@"')
    found, how = setup_py.find_cuda_home({"PATH": str(wrapper.parent)}, default=str(tmp_path / "none"))
    assert found == str(home), how
    assert str(wrapper) in how


def test_symlinked_nvcc_is_followed(tmp_path):
    home = _fake_toolkit(tmp_path, lib=os.path.join("targets", "x86_64-linux", "lib"))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").symlink_to(home / "bin" / "nvcc")
    found, _ = setup_py.find_cuda_home({"PATH": str(tmp_path / "bin")}, default=str(tmp_path / "none"))
    assert found == str(home)


def test_cuda_home_and_cuda_path_are_honoured(tmp_path):
    home = _fake_toolkit(tmp_path)
    other = _fake_toolkit(tmp_path / "other")
    for var in ("CUDA_HOME", "CUDA_PATH"):
        found, how = setup_py.find_cuda_home({var: str(home), "PATH": str(other / "bin")})
        assert found == str(home) and var in how


def test_a_named_toolkit_without_the_runtime_is_refused_by_name(tmp_path):
    home = _fake_toolkit(tmp_path, cudart=False)
    found, why = setup_py.find_cuda_home({"CUDA_HOME": str(home), "PATH": ""})
    assert found is None and str(home) in why and "libcudart" in why
    _script(tmp_path / "bin" / "nvcc", f'exec {home}/bin/nvcc "$@"')  # a wrapper to a toolkit with no runtime
    found, why = setup_py.find_cuda_home({"PATH": str(tmp_path / "bin")}, default=str(tmp_path / "none"))
    assert found is None and "libcudart" in why


def test_no_cuda_anywhere(tmp_path):
    found, why = setup_py.find_cuda_home({"PATH": str(tmp_path)}, default=str(tmp_path / "none"))
    assert found is None and "no nvcc" in why


def _toolkit_here() -> str | None:
    return setup_py.find_cuda_home()[0] if torch.version.cuda else None


@pytest.mark.skipif(_toolkit_here() is None or os.environ.get("AMFOR_BUILD_CUDA") == "0",
                    reason="no CUDA toolkit or no CUDA build of torch here: the CUDA kernels are not expected")
def test_the_installed_extension_has_its_cuda_kernels():
    """Where the build finds a toolkit (as CI's machine does, with no CUDA_HOME set), the installed amfor._C has
    CUDA kernels: a CUDA compile error, which the build turns into a warning, fails here."""
    from amfor.ops import extension_has_cuda, extension_status

    assert extension_status()[0], extension_status()[1]
    assert extension_has_cuda()


def _build(tmp_path: Path, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "AMFOR_BUILD_CUDA")}
    env.update(env_extra)
    cmd = [sys.executable, str(ROOT / "setup.py"), "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
           "--build-temp", str(tmp_path / "temp")]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.skipif(torch.version.cuda is None, reason="torch is not a CUDA build: the CUDA part is never tried")
def test_a_failing_cuda_part_falls_back_to_the_cpu_extension(tmp_path):
    """A toolkit whose nvcc fails: the CPU extension is built with one warning; AMFOR_BUILD_CUDA=1 makes it an error."""
    home = _fake_toolkit(tmp_path / "toolkit", nvcc_body='echo "nvcc: broken on purpose" >&2; exit 1')
    forced = _build(tmp_path / "forced", {"CUDA_HOME": str(home), "AMFOR_BUILD_CUDA": "1"})
    assert forced.returncode != 0
    built = _build(tmp_path / "fallback", {"CUDA_HOME": str(home)})
    assert built.returncode == 0, built.stderr[-3000:]
    warnings = [line for line in built.stderr.splitlines() if line.startswith("amfor: WARNING")]
    assert len(warnings) == 1 and "CUDA kernels failed to build" in warnings[0], built.stderr[-3000:]
    assert list((tmp_path / "fallback" / "lib" / "amfor").glob("_C*.so"))
